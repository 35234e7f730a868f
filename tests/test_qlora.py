"""QLoRA and DoRA: LoRA adapters on a frozen base that bitsandbytes quantizes as it loads
(model.quantization nf4 or int8), on the CPU. The loss falls; checkpoints hold the adapters
only and a halted run resumes to the uninterrupted run's export; the merged export is a plain
model (no quantization config, plain Linear layers) whose logits equal the quantized base
plus the adapter, and `launcher export` of the checkpoint writes the same tensors.

Tolerance on logits. NF4, 1e-4: the run merges dequantized base + B A into one fp32 weight;
the reference (bitsandbytes dequantizes the weight for each matmul on the CPU) multiplies by
the dequantized weight and adds the adapter's product apart, so they differ by fp32 rounding
(~1e-7 on logits of order 1). int8, 2e-2: LLM.int8() also quantizes the activations (all
but outlier features) for its int8 matmul, which no plain model reproduces; measured 5e-3
between the int8 forward and the dequantized weights' on this base without adapters. Against
the unquantized base the logits differ by about 1 (measured 1.18 on this model): the check
cannot pass by accident.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import CONFIGS, NO_MLFLOW, check, launcher
from test_distributed import load_model_weights, max_diff, weights
from test_pretrained import saved_models  # noqa: F401 - the fixture: a tiny BERT and Llama, save_pretrained

pytestmark = [pytest.mark.slow]

SFT = CONFIGS / "train" / "sft_tiny.yaml"
STEPS = ["train.max_steps=16", "eval.every_steps=8", "checkpoint.every_steps=8", "checkpoint.export=last",
         "data.synthetic.n_train=128", "data.synthetic.n_validation=16", "eval.max_new_tokens=2", "model.lora.enabled=true", "train.lr=5e-3",
         *NO_MLFLOW]


def _losses(run):
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def _reference_logits(base_dir, model_dir, kind: str, ids):
    """The quantized base as the run loaded it, with the trained adapter on top (peft)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launcher import quantization

    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization.bnb_config(kind, torch.float32),
                                                device_map={"": "cpu"}, dtype=torch.float32)
    assert quantization.is_quantized(base)
    quantization.keep_one_layout(base)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, model_dir / "adapter").eval()(input_ids=ids).logits


@pytest.mark.parametrize("kind, dora", [("nf4", False), ("nf4", True), ("int8", False)], ids=["nf4", "nf4-dora", "int8"])
def test_a_quantized_base_trains_adapters_and_exports_a_plain_model(kind, dora, tmp_path, saved_models):  # noqa: F811
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base_dir = saved_models / "llama"
    args = [*STEPS, f"model.name={base_dir}", f"model.quantization={kind}", f"model.lora.use_dora={str(dora).lower()}"]
    proc = check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "q", *args))
    run = tmp_path / "q"
    # Parameters count whole: a 4-bit weight packs two per element (its quant_state has the shape).
    n_train, n_all = (int(x.replace(",", "")) for x in re.search(r"LoRA: ([\d,]+) of ([\d,]+) parameters", proc.stdout).groups())
    assert n_all == n_train + sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    losses = _losses(run)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses  # falls (from ln(vocab) on this random base)
    with safe_open(str(run / "checkpoints" / "step-000016" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k][:5]  # no base, no quant state
    assert any("lora_magnitude_vector" in k for k in keys) == dora
    meta = json.loads((run / "model" / "launcher.json").read_text())
    assert meta["base_quantization"] == kind
    config = json.loads((run / "model" / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).eval()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    ids = torch.randint(3, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = plain(input_ids=ids).logits
        unquantized = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()(input_ids=ids).logits
    want = _reference_logits(base_dir, run / "model", kind, ids)
    assert float((got - want).abs().max()) < (1e-4 if kind == "nf4" else 2e-2)
    assert float((got - unquantized).abs().max()) > 1e-2  # (a sanity check; the quantization is checked just above)
    out = tmp_path / "exported"
    check(launcher("export", str(run / "checkpoints" / "step-000016"), str(out)))
    assert max_diff(load_model_weights(out), weights(run)) == 0.0


def test_a_halted_qlora_run_resumes_to_the_uninterrupted_export(tmp_path, saved_models):  # noqa: F811
    args = [*STEPS, f"model.name={saved_models / 'llama'}", "model.quantization=nf4"]
    check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "full", *args))
    check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "halted", *args, "train.halt_at_step=8"))
    resumed = check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "halted", *args))
    assert "resuming from" in resumed.stdout
    assert max_diff(weights(tmp_path / "halted"), weights(tmp_path / "full")) < 1e-6


def test_quantization_is_refused_where_it_cannot_run(tmp_path):
    from launcher.config import load_config
    from launcher.distributed import LaunchConfig
    from launcher.engines import model_problems
    from launcher.errors import ConfigError

    def problems(*overrides):
        try:
            load_config(SFT, list(overrides), check_files=False)
        except ConfigError as e:
            return list(e.args)
        return []

    assert problems("model.quantization=nf4") == [
        "model.quantization: nf4 trains LoRA adapters on a frozen quantized base: set model.lora.enabled=true"]
    assert problems("model.quantization=nf4", "model.lora.enabled=true")[0].startswith(
        "model.quantization: nf4 loads pretrained weights")
    assert problems("model.quantization=int8", "model.lora.enabled=true", "model.name=/x", "model.lora.use_dora=true") == [
        "model.lora.use_dora: not with model.quantization=int8 (bitsandbytes' 8-bit layers fail under DoRA); use nf4"]
    cfg = load_config(SFT, ["model.quantization=nf4", "model.lora.enabled=true", "model.name=/x"], check_files=False)
    ddp = LaunchConfig(source="cpu_ddp.yaml", num_processes=2, distributed_type="MULTI_CPU")
    assert model_problems(cfg.train, cfg.model, ddp) == ["model.quantization: nf4 runs on one process for now (bitsandbytes' packed base "
                                       "weights under DDP, ZeRO and FSDP2 are not tested here); launch without cpu_ddp.yaml"]
    assert model_problems(cfg.train, cfg.model, LaunchConfig(source="one process")) == []


def test_plan_counts_a_quantized_base_as_bitsandbytes_stores_it(saved_models):  # noqa: F811
    """`launcher plan` counts what bitsandbytes quantizes (every linear weight but the head's) at
    NF4's bytes per weight: the loaded model holds exactly that many weights, packed two per
    byte, with one 8-bit absmax per 64 (the per-tensor lookup tables, ~1 KiB each, are left
    out: noise at real sizes); the rest of the frozen base stays fp32."""
    import re

    import torch
    from transformers import AutoModelForCausalLM

    from launcher import quantization

    base_dir = saved_models / "llama"
    proc = check(launcher("plan", str(SFT), f"model.name={base_dir}", "model.lora.enabled=true", "model.quantization=nf4"))
    n_q = int(re.search(r"frozen base +([\d,]+) x 0\.516 B \(nf4\)", proc.stdout).group(1).replace(",", ""))
    n_rest = int(re.search(r"and +([\d,]+) x 4 B \(fp32", proc.stdout).group(1).replace(",", ""))
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization.bnb_config("nf4", torch.float32),
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    layers = [m for m in model.modules() if quantization._kind(m) == "nf4"]
    assert sum(m.weight.numel() for m in layers) * 2 == n_q  # packed: two 4-bit weights per byte
    assert sum(m.weight.quant_state.absmax.numel() for m in layers) == n_q // 64
    assert all(m.weight.quant_state.absmax.dtype == torch.uint8 for m in layers)  # double quantization
    plain = sum(p.numel() for n, p in model.named_parameters() if not any(n.startswith(k) for k in
                                                                         [x for x, m in model.named_modules() if m in layers]))
    assert plain == n_rest


def test_a_4bit_layer_reads_the_same_weights_in_evaluation_as_in_training(tmp_path):
    """bitsandbytes 0.50, on a CPU with AVX512-BF16, rewrites a 4-bit weight into a packed
    inference layout the first time its layer runs in eval mode without gradients. Where this
    CPU has that instruction set, the fact is pinned on a copy loaded without
    `keep_one_layout` (the weight read back changes). The run's loading keeps one layout:
    evaluation gives the training-mode logits exactly and the weight the export reads is the
    one that trained."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from launcher import quantization

    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128)).save_pretrained(tmp_path / "base")

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map={"": "cpu"}, dtype=torch.float32,
                                                    quantization_config=quantization.bnb_config("nf4", torch.float32))

    def evaluate_then_read(model):
        layer = model.model.layers[0].self_attn.q_proj
        before = quantization.dequantized_weight(layer).clone()
        model.train()
        trained = model(input_ids=ids).logits.detach()
        model.eval()
        with torch.no_grad():
            evaluated = model(input_ids=ids).logits
        return before, quantization.dequantized_weight(layer), trained, evaluated

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    if bnb.functional.has_avx512bf16():  # the stack's behaviour that keep_one_layout exists for
        before, after, _, _ = evaluate_then_read(load())
        assert not torch.equal(before, after)
    model = load()
    quantization.keep_one_layout(model)
    before, after, trained, evaluated = evaluate_then_read(model)
    assert torch.equal(before, after)
    assert torch.equal(trained, evaluated)
