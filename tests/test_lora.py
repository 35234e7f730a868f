"""LoRA through the same loop: what trains, what is exported, and that merged == base + adapter."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.config import load_config
from launcher.errors import ConfigError

from conftest import CONFIGS, TINY, all_runs, check, exported_checkpoint, launcher, mlflow_client, task_tokenizer

SFT = CONFIGS / "train" / "sft_tiny.yaml"
SFT_LORA = CONFIGS / "train" / "sft_lora_tiny.yaml"


def _expected_trainable(base, targets, head_names, r):
    """r x (in + out) per adapted Linear, plus the whole head (peft's modules_to_save)."""
    total = 0
    for name, module in base.named_modules():
        leaf = name.split(".")[-1]
        if isinstance(module, torch.nn.Linear) and leaf in targets:
            total += r * (module.in_features + module.out_features)
        if leaf in head_names:
            total += sum(p.numel() for p in module.parameters())
    return total


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_only_adapters_and_head_train_and_the_count_is_exact(task, tmp_path):
    from launcher import tasks

    config = TINY if task == "classification" else SFT
    targets = ["query", "value"] if task == "classification" else ["q_proj", "v_proj"]
    cfg = load_config(config, ["model.lora.enabled=true", "model.lora.r=4", f"model.lora.target_modules=[{','.join(targets)}]"])
    t = tasks.for_config(cfg)
    from launcher.data import instructions, synthetic

    rows = (synthetic.generate_clauses(50, 0), None) if task == "classification" else instructions.generate_instructions(20, 0)
    if task == "classification":
        tok = task_tokenizer(t, tmp_path, rows[0])
    else:
        tok = task_tokenizer(t, tmp_path, rows)
    plain_cfg = load_config(config, ["model.lora.enabled=false", "model.lora.r=4",
                                     f"model.lora.target_modules=[{','.join(targets)}]"])
    plain = tasks.for_config(plain_cfg).build_model(tok)  # the same model without adapters, to count from
    model = t.build_model(tok)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    heads = {"classifier"} if task == "classification" else set()  # a causal LM's head stays frozen
    expected = _expected_trainable(plain, set(targets), heads, 4)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def _refused_at_build(tmp_path, *overrides: str) -> list[str]:
    """The problems building the tiny classifier with LoRA and these overrides raises."""
    from launcher import tasks
    from launcher.data import synthetic

    t = tasks.for_config(load_config(TINY, ["model.lora.enabled=true", *overrides]))
    tok = task_tokenizer(t, tmp_path, synthetic.generate_clauses(20, 0))
    with pytest.raises(ConfigError) as e:
        t.build_model(tok)
    return e.value.problems


def test_unknown_target_module_is_one_clear_line(tmp_path):
    problems = _refused_at_build(tmp_path, "model.lora.target_modules=[qq_proj]")
    assert problems[0].startswith("model.lora.target_modules: ") and "qq_proj" in problems[0]


def test_target_modules_must_be_names_or_all_linear():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["model.lora.enabled=true", "model.lora.target_modules=3"])
    assert e.value.problems == ['model.lora.target_modules: a list of module names or "all-linear"; got 3']


@pytest.mark.parametrize("task, arch, checkpointing", [("classification", "bert", False), ("causal_lm", "llama", False),
                                                      ("causal_lm", "gpt2", False), ("causal_lm", "llama", True)])
def test_layers_to_transform_adapts_only_those_blocks_and_the_backward_pass_stops_at_the_lowest(task, arch, checkpointing,
                                                                                                tmp_path):
    from transformers.pytorch_utils import Conv1D

    from launcher import tasks
    from launcher.data import instructions, synthetic

    config = TINY if task == "classification" else SFT
    common = ["model.lora.r=4", "model.tiny.num_layers=3", f"model.tiny.arch={arch}",
              f"train.gradient_checkpointing={checkpointing}"]
    cfg = load_config(config, ["model.lora.enabled=true", "model.lora.layers_to_transform=[1,2]", *common])
    t = tasks.for_config(cfg)
    rows = synthetic.generate_clauses(50, 0) if task == "classification" else instructions.generate_instructions(20, 0)
    tok = task_tokenizer(t, tmp_path, rows)
    torch.manual_seed(0)
    plain = tasks.for_config(load_config(config, common)).build_model(tok)
    model = t.build_model(tok)

    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(".1." in n or ".2." in n for n in lora)
    def numbered(m):
        return [b for n, b in m.named_modules() if n.split(".")[-1].isdigit() and n.split(".")[-2] in ("layer", "layers", "h")]

    blocks = numbered(plain)
    assert len(blocks) == 3
    linears = [m for b in blocks[1:] for m in b.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    heads = {"classifier"} if task == "classification" else set()
    expected = sum(4 * sum(m.weight.shape) for m in linears) + _expected_trainable(plain, set(), heads, 4)
    assert linears and sum(p.numel() for p in model.parameters() if p.requires_grad) == expected

    needs_grad = {}  # block number -> whether its output joins the backward graph
    for i, block in enumerate(numbered(model)):
        block.register_forward_hook(lambda _m, _i, out, i=i: needs_grad.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    ids = torch.randint(5, 100, (2, 6))
    model.train()  # where activation checkpointing acts
    assert model.is_gradient_checkpointing == checkpointing
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1]) if heads else ids)
    out.loss.backward()
    assert needs_grad == {0: False, 1: True, 2: True}
    assert all(p.grad is not None for n, p in model.named_parameters() if n in lora)


def test_layers_to_transform_names_the_blocks_the_model_has(tmp_path):
    assert _refused_at_build(tmp_path, "model.lora.layers_to_transform=[1,2,7]") == [
        "model.lora.layers_to_transform: 2, 7 not a block of BertForSequenceClassification (blocks 0-1)"]
    from transformers import T5Config, T5ForConditionalGeneration

    from launcher.tasks import lora

    two_stacks = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8, vocab_size=50))
    with pytest.raises(ConfigError) as e:  # peft would adapt block 1 of the encoder and of the decoder
        lora.apply(two_stacks, load_config(SFT, ["model.lora.enabled=true", "model.lora.layers_to_transform=[1]"]).model.lora,
                   "causal_lm")
    assert e.value.problems == ["model.lora.layers_to_transform: T5ForConditionalGeneration has more than one stack of "
                                "numbered blocks (decoder.block, encoder.block); leave it unset to adapt every block"]
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["model.lora.enabled=true", "model.lora.layers_to_transform=[-1]"])
    assert e.value.problems == ["model.lora.layers_to_transform: a non-empty list of block numbers from 0; got [-1]"]


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [[], ["model.lora.layers_to_transform=[1]"]], ids=["every-block", "upper-block"])
def test_lora_classifier_learns_and_exports_adapter_base_and_merged_model(tmp_path, blocks):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    proc = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "lora",
                          "model.lora.enabled=true", "train.lr=5e-3", "train.max_steps=100", *blocks))
    run = tmp_path / "lora"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LoRA: "))
    trainable, total = (int(x.replace(",", "")) for x in line.split()[1::2][:2])
    assert trainable < total / 5
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["before"]["macro_f1"] < 0.5 and final["after"]["macro_f1"] > 0.9  # frozen random body, trained adapters
    (mlrun,) = all_runs(mlflow_client(tmp_path))
    assert int(mlrun.data.params["derived.n_trainable_parameters"]) == trainable
    adapter = load_file(run / "model" / "adapter" / "adapter_model.safetensors")
    assert sum(v.numel() for v in adapter.values()) == trainable
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # trained, not the zero init

    tok = AutoTokenizer.from_pretrained(run / "model")
    merged = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    on_base = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(run / "model" / "base"),
                                        run / "model" / "adapter").eval()
    enc = tok(["We may terminate your account at any time.", "You can export your data."], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits, on_base(**enc).logits, atol=1e-5)

    out = tmp_path / "exported"  # the offline export of the LoRA checkpoint gives the same model
    proc = check(launcher("export", str(exported_checkpoint(run)), str(out)))
    assert "LoRA" in proc.stdout
    a, b = load_file(out / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---------------------------------------------------------------- dropout masks on CPU


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_cpu_dropout_keeps_each_element_with_probability_1_minus_p_and_backpropagates_its_mask(p):
    """CpuDropout (the masks every model launcher builds draws on CPU): the kept fraction is
    1 - p within 6 standard deviations, kept elements are scaled by 1 / (1 - p), neighbours
    (the two halves of one 64-bit draw) are independent, the gradient is the same mask, and
    torch.manual_seed fixes the masks."""
    from launcher.tasks.dropout import CpuDropout, keep_mask

    n = 2_000_000
    x = torch.rand(n) + 1.0  # no zeros: a zero in the output is a dropped element
    drop = CpuDropout(p).train()
    torch.manual_seed(3)
    xg = x.clone().requires_grad_()
    y = drop(xg)
    kept = y != 0
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(float(kept.float().mean()) - (1 - p)) < 6 * sd
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)
    pairs = kept.view(-1, 2)  # elements 2k and 2k+1 come from one 64-bit draw
    both = float((~pairs[:, 0] & ~pairs[:, 1]).float().mean())
    assert abs(both - p * p) < 6 * (p * p * (1 - p * p) / (n // 2)) ** 0.5
    saved = y.grad_fn.next_functions[0][0]._saved_condition  # what backward keeps: the bool mask
    assert saved.dtype == torch.bool and torch.equal(saved, kept)
    g = torch.randn(n)
    y.backward(g)
    assert torch.equal(xg.grad, torch.where(kept, g, 0.0) * (1 / (1 - p)))
    torch.manual_seed(3)
    assert torch.equal(drop(x) != 0, kept)  # same seed, same mask
    assert not torch.equal(drop(x) != 0, kept)  # the next draw is another mask
    assert torch.equal(drop.eval()(x), x)
    assert not keep_mask((1000,), 1 - 2**-40).any()  # a threshold past int32's range drops everything


def test_built_models_draw_cpu_dropout_masks_that_activation_checkpointing_replays(tmp_path):
    """Every nn.Dropout of a built model, LoRA's included, is a CpuDropout (still an
    nn.Dropout). Activation checkpointing recomputes the forward in backward; the masks must be
    the same then, or the gradients would belong to another network: a LoRA model with dropout
    0.3 gets the same gradients with and without checkpointing, and other gradients in
    evaluation mode (so dropout acted)."""
    from launcher import tasks
    from launcher.data import instructions
    from launcher.tasks.dropout import CpuDropout

    over = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.3", "model.lora.target_modules=all-linear"]
    t = tasks.for_config(load_config(SFT, over))
    tok = task_tokenizer(t, tmp_path, instructions.generate_instructions(20, 0))
    ids = torch.randint(5, len(tok), (2, 12))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def grads(checkpointing: bool, train: bool) -> dict:
        torch.manual_seed(0)
        model = tasks.for_config(load_config(SFT, [*over, f"train.gradient_checkpointing={str(checkpointing).lower()}"])).build_model(tok)
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all(type(m) is CpuDropout for m in drops)
        assert any("lora_dropout" in n for n, m in model.named_modules() if type(m) is CpuDropout)
        model.train(train)
        torch.manual_seed(1)
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed, evaluated = grads(False, True), grads(True, True), grads(False, False)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7), name
    assert any(not torch.allclose(plain[n], evaluated[n], rtol=1e-3, atol=1e-6) for n in plain)


def test_a_lora_plan_says_nothing_on_stderr_and_a_bad_one_one_line():
    """peft imports bitsandbytes, which on a CPU with AVX512-BF16 asked the hub for a 4-bit
    CPU kernel at import: two unrelated warnings before every LoRA start, and a bad LoRA
    config's one error line came third."""
    proc = check(launcher("plan", str(CONFIGS / "train" / "sft_lora_tiny.yaml")))
    assert proc.stderr == ""
    proc = launcher("plan", str(SFT), "model.lora.enabled=true", "model.lora.layers_to_transform=[5]")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(
        "error: model.lora.layers_to_transform: 5 not a block of"), proc.stderr


@pytest.mark.parametrize("targets", ["[c_attn,lm_head]", "[wte]"], ids=["head", "embeddings"])
def test_an_adapter_on_a_tied_head_merges_into_the_model_it_trained(tmp_path, targets):
    """GPT-2's head is tied to its token embeddings. With lm_head among the targets the run
    trains the head as E + BA while the embeddings stay E (or the other way round with wte);
    merged into the one shared tensor, the adapter changed both, and the export evaluated 7.18
    against the run's 1.65. The merged export is now untied and evaluates as the run did. GPT-2's own layer
    names (Conv1D: c_attn) are targets too; they were "not among the linear layers"."""
    from safetensors.torch import load_file

    check(launcher("train", str(SFT_LORA), "--output-dir", str(tmp_path), "--run-name", "g", "model.tiny.arch=gpt2",
                   f"model.lora.target_modules={targets}", "model.lora.modules_to_save=[]", "train.max_steps=4",
                   "eval.every_steps=4", "eval.at_start=false", "train.lr=5e-2", "tracking.mlflow=false"))
    run = tmp_path / "g"
    trained = json.loads((run / "final_metrics.json").read_text())["after"]["loss"]
    scored = json.loads(check(launcher("eval", str(run / "model"), "--data", str(run / "data" / "validation.jsonl"))).stdout)
    assert scored["loss"] == pytest.approx(trained, rel=1e-4), (scored["loss"], trained)
    assert json.loads((run / "model" / "config.json").read_text())["tie_word_embeddings"] is False
    merged, base = load_file(run / "model" / "model.safetensors"), load_file(run / "model" / "base" / "model.safetensors")
    adapted, frozen = ("lm_head", "transformer.wte") if targets != "[wte]" else ("transformer.wte", "lm_head")
    assert torch.equal(merged[f"{frozen}.weight"], base["transformer.wte.weight"])  # the other table as trained
    assert not torch.equal(merged[f"{adapted}.weight"], base["transformer.wte.weight"])  # this one with its adapter
    # The export's adapter/ as model.name: one line naming the export to give (eval and predict said it).
    proc = launcher("train", str(SFT_LORA), "--output-dir", str(tmp_path / "again"), f"model.name={run / 'model' / 'adapter'}")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: model.name: {run / 'model' / 'adapter'} is the LoRA adapter of the export {run / 'model'}; give "
        f"{run / 'model'} (the merged model) to train on from it"), proc.stderr[-2000:]


def test_dotted_and_embedding_names_are_targets_as_peft_matches_them(tmp_path):
    """peft matches a name by the end of a module's dotted name: self_attn.q_proj, model.norm
    and embed_tokens were refused (only the last part was compared, against linear layers),
    model.norm as "not a module"."""
    from launcher import tasks

    t = tasks.for_config(load_config(SFT_LORA, ["model.lora.target_modules=[self_attn.q_proj,embed_tokens]",
                                                "model.lora.modules_to_save=[model.norm]"]))
    tok = task_tokenizer(t, tmp_path, [{"instruction": "a b", "output": "c d"}] * 4)
    names = [n for n, _ in t.build_model(tok).named_modules()]
    assert any(n.endswith("self_attn.q_proj.lora_A") for n in names) and any(n.endswith("embed_tokens.lora_embedding_A")
                                                                            for n in names)
    assert any(n.endswith("model.norm.modules_to_save") for n in names)


def test_a_fractional_alpha_is_peft_s_scaling(tmp_path):
    """peft takes lora_alpha as a number (alpha / r scales the adapter): 16.5 was refused as
    "expected int"."""
    from launcher import tasks

    t = tasks.for_config(load_config(SFT_LORA, ["model.lora.alpha=16.5", "model.lora.r=4"]))
    tok = task_tokenizer(t, tmp_path, [{"instruction": "a b", "output": "c d"}] * 4)
    scalings = {m.scaling["default"] for m in t.build_model(tok).modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {16.5 / 4}
