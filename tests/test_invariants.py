"""Invariants that catch GPU-scale bugs on CPU: the same optimizer step whatever the
micro-batch size, accumulation and world size; activation checkpointing that changes memory
and not numbers; the dtype policy and weight decay as each engine really applies them.

Tolerance for "the same step": every run sums the same per-item losses and divides by the
same global item count; they differ only in the order floating-point sums are taken (over
micro-batches, over ranks). Measured: relative differences of loss and gradient norm below
1e-6; the test allows 1e-5. Without the token-exact loss, micro-batches of 1-word and 50-word
answers weigh the same: with per-micro-batch means the accumulated step's loss read
3.17 against 2.31 for the whole batch on this data (checked by reverting the loop once).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, FAST, NO_MLFLOW, OFFLINE_ENV, ROOT, TINY, check, launcher

SFT = CONFIGS / "train" / "sft_tiny.yaml"
ACCEL = CONFIGS / "accelerate"
REL = 1e-5

pytestmark = pytest.mark.slow


def train_series(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def assert_same_steps(a: Path, b: Path, steps=(1, 2)) -> None:
    sa, sb = train_series(a), train_series(b)
    for s in steps:
        for key in ("train/loss", "train/grad_norm"):
            assert sb[s][key] == pytest.approx(sa[s][key], rel=REL), (s, key, sa[s][key], sb[s][key])


def max_weight_diff(a: Path, b: Path) -> float:
    """Absolute: an Adam step moves a weight by about lr (1e-3 here), so 1e-5 catches a
    different step; relative differences mean nothing for parameters whose gradient is 0
    (a key bias: softmax ignores it), which stay at their initial noise."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def write_uneven_sft(path: Path, n: int = 48) -> Path:
    """Answers of 1 word and of 50 words: per-micro-batch means would weigh them alike."""
    words = "amber basil cedar delta ember fjord garnet harbor indigo juniper".split()
    rows = []
    for i in range(n):
        length = 50 if i % 4 == 0 else 1
        rows.append({"instruction": f"Say {words[i % 10]} {length} times", "input": "",
                     "output": " ".join(words[(i + j) % 10] for j in range(length))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_args(tmp_path: Path) -> list[str]:
    train = write_uneven_sft(tmp_path / "uneven.jsonl")
    return ["data.synthetic.enabled=false", f"data.train_file={train}", f"data.validation_file={train}",
            "data.max_length=96", "model.tiny.dropout=0", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
            "train.max_steps=2", "train.warmup_steps=0", "train.global_batch_size=8", "eval.at_start=false",
            "eval.every_steps=0", "checkpoint.every_steps=0", "eval.max_new_tokens=2", "train.max_grad_norm=1000",
            *NO_MLFLOW]


CLAUSE = FAST + ["model.tiny.dropout=0", "train.max_steps=2", "train.warmup_steps=0", "eval.at_start=false",
                 "eval.every_steps=0", "checkpoint.every_steps=0", "train.class_weighting=balanced",
                 "train.max_grad_norm=1000", *NO_MLFLOW]


def _launch_2(tmp_path: Path, name: str, config: Path, args: list[str], accel: str = "cpu_ddp.yaml"):
    from test_distributed import accelerate_launch

    return check(accelerate_launch(["--config_file", str(ACCEL / accel), "--num_processes", "2"], tmp_path, name,
                                   *args, config=config, base=[]))


@pytest.mark.distributed
@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_accumulation_and_ranks_do_not_change_the_step(tmp_path, task):
    """One global batch of 8 (causal LM: answers of 1 and 50 words) or 32 (classifier with
    class weights): micro = global, micro x accumulation, and 2 ranks take the same step.
    The item count the loss divides by, summed on each rank from the step's rows without a
    collective, equals the all-reduce of what each rank's batches hold (the test suite runs
    that all-reduce beside it and records both)."""
    config, args, micro = (SFT, sft_args(tmp_path), (8, 2, 2)) if task == "causal_lm" else (TINY, CLAUSE, (32, 4, 4))
    check(launcher("train", str(config), "--output-dir", str(tmp_path), "--run-name", "whole", *args,
                   f"train.micro_batch_size={micro[0]}"))
    check(launcher("train", str(config), "--output-dir", str(tmp_path), "--run-name", "accum", *args,
                   f"train.micro_batch_size={micro[1]}"))
    _launch_2(tmp_path, "ranks", config, [*args, f"train.micro_batch_size={micro[2]}"])
    for other in ("accum", "ranks"):
        assert_same_steps(tmp_path / "whole", tmp_path / other)
        assert max_weight_diff(tmp_path / "whole", tmp_path / other) < 1e-5
    (whole,), (rank0, rank1) = items_checked(tmp_path / "whole", 1), items_checked(tmp_path / "ranks", 2)
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [r["step"] for r in whole] == [1, 2]
    for one, a, b in zip(whole, rank0, rank1):
        assert a["from_rows"] == b["from_rows"] and a["all_reduced"] == b["all_reduced"], (a, b)
        assert a["from_rows"] == pytest.approx(a["all_reduced"], rel=1e-9) == one["from_rows"], (one, a)
        assert a["here"] + b["here"] == a["all_reduced"] and 0 < a["here"] < a["all_reduced"], (a, b)


def items_checked(run: Path, world: int) -> list[list[dict]]:
    """Each rank's records of its steps' item counts: from the rows, in its batches, all-reduced."""
    return [[json.loads(line) for line in (run / "ranks" / f"items-rank-{r:05d}.jsonl").read_text().splitlines()]
            for r in range(world)]


_DDP_PROBE = """
import os, torch, torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from launcher import engines
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).bfloat16(), torch.nn.Linear(4, 4).bfloat16())
model[2].requires_grad_(False)
print(engines.reduce_dtypes(torch.nn.parallel.DistributedDataParallel(model)))
hooked = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
hooked.register_comm_hook(None, default_hooks.fp16_compress_hook)
print(engines.reduce_dtypes(hooked))
"""


def test_ddp_reports_the_dtypes_its_reducer_really_uses():
    """What the model facts report for DDP is read from DDP's own record: its buckets' dtypes
    (trainable parameters only: a frozen bf16 layer is no bucket), or the dtype a registered
    compress hook sends."""
    from test_distributed import free_port

    out = subprocess.run([sys.executable, "-c", _DDP_PROBE], capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, **OFFLINE_ENV, "PORT": str(free_port())})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["['bfloat16', 'float32']", "['float16']"]


def test_checkpointing_changes_nothing_in_the_numbers(tmp_path):
    """Dropout on: recomputation replays the RNG, so loss, gradients and weights are the same;
    with LoRA (frozen inputs) too."""
    base = [*sft_args(tmp_path), "model.tiny.dropout=0.1", "train.micro_batch_size=4"]
    for name, extra in (("plain", []), ("ckpt", ["train.gradient_checkpointing=true"])):
        check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", name, *base, *extra))
    assert_same_steps(tmp_path / "plain", tmp_path / "ckpt")
    assert max_weight_diff(tmp_path / "plain", tmp_path / "ckpt") < 1e-6
    lora = ["model.lora.enabled=true", "model.lora.modules_to_save=[lm_head]"]
    for name, extra in (("lora", []), ("lora-ckpt", ["train.gradient_checkpointing=true"])):
        check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", name, *base, *lora, *extra))
    assert_same_steps(tmp_path / "lora", tmp_path / "lora-ckpt")
    assert max_weight_diff(tmp_path / "lora", tmp_path / "lora-ckpt") < 1e-6


@pytest.mark.distributed
def test_checkpointing_under_zero3_changes_nothing_either(tmp_path):
    """Non-reentrant checkpointing with ZeRO-3's parameter hooks: recomputation gathers the
    partitioned weights again, and the step is the one of an uncheckpointed ZeRO-3 run."""
    base = [*sft_args(tmp_path), "train.micro_batch_size=2"]
    _launch_2(tmp_path, "z3", SFT, base, accel="deepspeed_zero3.yaml")
    _launch_2(tmp_path, "z3-ckpt", SFT, [*base, "train.gradient_checkpointing=true"], accel="deepspeed_zero3.yaml")
    assert_same_steps(tmp_path / "z3", tmp_path / "z3-ckpt")
    assert max_weight_diff(tmp_path / "z3", tmp_path / "z3-ckpt") < 1e-6


_MEMORY_PROBE = """
import resource, sys, torch
from transformers import LlamaConfig, AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024,
    num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, use_cache=False),
    attn_implementation="sdpa")
model.train()  # checkpointing only recomputes in training mode
if sys.argv[1] == "1":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
ids = torch.randint(0, 512, (4, 1024))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(input_ids=ids, labels=ids).loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_checkpointing_lowers_peak_activation_memory():
    """A 13M-parameter, 16-layer Llama, 4 x 1024 tokens, one forward and backward in a fresh process:
    the growth of peak RSS (activations and gradients) with and without checkpointing.

    A fixed glibc mmap threshold: every large tensor is its own mapping, returned when freed,
    so peak RSS follows the peak of live memory. With glibc's default dynamic threshold, freed
    tensors stay in the heap and the peak depends on fragmentation: a clean-clone CI run once
    measured 1569 vs 1062 MB where this machine usually gives 2150 vs 1120 (1717 vs 221 fixed)."""
    grow = {}
    for on in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, on], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, **OFFLINE_ENV, "MALLOC_MMAP_THRESHOLD_": "131072"})
        grow[on] = int(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth: {grow['0']} MB without checkpointing, {grow['1']} MB with")
    assert grow["1"] < 0.6 * grow["0"], grow  # measured 221 vs 1717 MB


def model_facts(run: Path, rank: int = 0) -> dict:
    return json.loads((run / "ranks" / f"model-rank-{rank:05d}.json").read_text())


@pytest.mark.distributed
def test_dtypes_per_engine(tmp_path):
    """bf16 compute: fp32 weights and fp32 Adam states where no engine keeps masters (one
    process; DDP never casts), bf16 weights with fp32 masters and states under ZeRO-2/3, a bf16 frozen
    base under fp32 adapters with LoRA. Gradients are reduced, and summed over micro-batches, in
    fp32 by every engine (DeepSpeed's default would be bf16 for both, accelerate's FSDP2 policy
    bf16), unless train.reduce_in_fp32=false."""
    args = [*CLAUSE, "train.precision=bf16", "train.micro_batch_size=16"]
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "one", *args))
    facts = model_facts(tmp_path / "one")
    assert facts["parameters"] == {"float32": facts["decayed"] + facts["not_decayed"]}
    assert set(facts["optimizer_states"]) == {"float32"} and facts["reduce_dtypes"] == ["float32"]
    assert facts["accumulate_dtypes"] == ["float32"]
    # DDP's reducer records its buckets' dtype, read here on both ranks (that a compressing comm
    # hook would be read as its dtype: test_ddp_reports_the_dtypes_its_reducer_really_uses).
    _launch_2(tmp_path, "ddp", TINY, args, accel="cpu_ddp.yaml")
    for rank in (0, 1):
        ddp = model_facts(tmp_path / "ddp", rank)
        assert set(ddp["parameters"]) == {"float32"} and ddp["reduce_dtypes"] == ["float32"], ddp
    for stage in (2, 3):
        _launch_2(tmp_path, f"z{stage}", TINY, args, accel=f"deepspeed_zero{stage}.yaml")
        for rank in (0, 1):
            z = model_facts(tmp_path / f"z{stage}", rank)
            assert set(z["parameters"]) == {"bfloat16"}, z
            assert set(z["fp32_masters"]) == {"float32"} and set(z["optimizer_states"]) == {"float32"}, z
            assert z["reduce_dtypes"] == ["float32"] and z["accumulate_dtypes"] == ["float32"], z
    # The export (auto: float32, as the tiny model's config says) is read from the fp32 masters,
    # not widened from the bf16 weights: the same tensors as `launcher export` of that checkpoint.
    from safetensors.torch import load_file

    step = json.loads((tmp_path / "z2" / "final_metrics.json").read_text())["exported_step"]
    check(launcher("export", str(tmp_path / "z2" / "checkpoints" / f"step-{step:06d}"), str(tmp_path / "z2-offline")))
    online, offline = (load_file(d / "model.safetensors") for d in (tmp_path / "z2" / "model", tmp_path / "z2-offline"))
    assert {v.dtype for v in online.values()} == {torch.float32}
    assert online.keys() == offline.keys() and all(torch.equal(online[k], offline[k]) for k in online)
    assert any(not torch.equal(online[k], online[k].bfloat16().float()) for k in online)  # not a widened bf16 copy
    # A run resumed by path from that last checkpoint (nothing left to train) exports it alike:
    # the masters come from the checkpoint it loaded, outside its own run directory.
    _launch_2(tmp_path, "z2-again", TINY, [*args, f"checkpoint.resume={tmp_path / 'z2' / 'checkpoints' / f'step-{step:06d}'}"],
              accel="deepspeed_zero2.yaml")
    again = load_file(tmp_path / "z2-again" / "model" / "model.safetensors")
    assert all(torch.equal(online[k], again[k]) for k in online)
    # float16 from bf16 training is read from the masters too (not rounded twice), as offline.
    _launch_2(tmp_path, "z2-bf16", TINY, [*args, "train.reduce_in_fp32=false", "checkpoint.export_dtype=float16"],
              accel="deepspeed_zero2.yaml")
    assert model_facts(tmp_path / "z2-bf16")["reduce_dtypes"] == ["bfloat16"]
    assert model_facts(tmp_path / "z2-bf16")["accumulate_dtypes"] == ["bfloat16"]  # DeepSpeed's own default
    step = json.loads((tmp_path / "z2-bf16" / "final_metrics.json").read_text())["exported_step"]
    check(launcher("export", str(tmp_path / "z2-bf16" / "checkpoints" / f"step-{step:06d}"), str(tmp_path / "z2h-offline")))
    online, offline = (load_file(d / "model.safetensors") for d in (tmp_path / "z2-bf16" / "model", tmp_path / "z2h-offline"))
    assert {v.dtype for v in online.values()} == {torch.float16}
    assert all(torch.equal(online[k], offline[k]) for k in online)
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "lora", *args, "model.lora.enabled=true"))
    lora = model_facts(tmp_path / "lora")
    assert set(lora["trainable"]) == {"float32"} and lora["parameters"].get("bfloat16", 0) > 0


_FSDP2_PROBE = """
import json, sys, torch, torch.distributed as dist
from types import SimpleNamespace
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.fsdp import fully_shard
from launcher import engines
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
plugin.set_mixed_precision("bf16")  # what accelerate does for train.precision=bf16
default = plugin.mixed_precision_policy
engines.fsdp_reduce_in_fp32(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), sys.argv[2] == "1")
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
for layer in (model[0], model[2], model):
    fully_shard(layer, mp_policy=plugin.mixed_precision_policy)
out = model(torch.randn(4, 8))
out.sum().backward()
print(json.dumps({"accelerate": [str(default.reduce_dtype), str(default.output_dtype)],
                  "reduce_dtypes": engines.reduce_dtypes(model), "output": str(out.dtype)}))
"""


@pytest.mark.parametrize("fp32", [True, False])
def test_fsdp2_reduces_in_fp32_where_accelerate_would_in_bf16(fp32):
    """accelerate's FSDP2 policy for bf16 reduces gradients and returns outputs in bf16 (pinned
    here); train.reduce_in_fp32 widens both, read back from the sharded parameters FSDP2 built.
    (A whole bf16 FSDP2 run does not fit CPU: layer norms meet bf16 parameters under autocast;
    launcher refuses it there, below.)"""
    from test_distributed import free_port

    proc = subprocess.run([sys.executable, "-c", _FSDP2_PROBE, str(free_port()), "1" if fp32 else "0"],
                          capture_output=True, text=True, env={**__import__("os").environ, **OFFLINE_ENV}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    # accelerate's own bf16 policy: reduce in bf16; output_dtype bf16 up to 1.15, None from 1.16
    # (outputs stay in the bf16 compute dtype: the reduce_in_fp32=false case reads bf16 below).
    assert facts["accelerate"][0] == "torch.bfloat16" and facts["accelerate"][1] in ("torch.bfloat16", "None"), facts
    wide = "float32" if fp32 else "bfloat16"
    assert facts["reduce_dtypes"] == [wide] and facts["output"] == f"torch.{wide}", facts


def test_fsdp2_with_bf16_on_cpu_is_one_line_before_any_rank_starts(tmp_path):
    proc = launcher("train", str(TINY), "--output-dir", str(tmp_path), "--accelerate-config", str(ACCEL / "fsdp2.yaml"),
                    "--num-processes", "2", *FAST, "train.precision=bf16")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"error: {ACCEL / 'fsdp2.yaml'}: FSDP2 with train.precision=bf16 does not run on CPU (under "
                    "autocast, layer norms meet FSDP's bf16 parameters); rehearse it with train.precision=no")
    assert not list(tmp_path.iterdir())


def test_bf16_weights_without_master_copies_are_refused(tmp_path):
    proc = launcher("train", str(TINY), "--output-dir", str(tmp_path), *FAST, "train.precision=bf16", "model.dtype=bfloat16")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() + proc.stdout.splitlines() if x.startswith("error:")]
    assert "model.dtype: bfloat16 under NO" in line and "no fp32 master" in line
    assert not list(tmp_path.iterdir())


_LOSS_PROBE = """
import resource, sys, torch
from transformers import LlamaConfig, AutoModelForCausalLM
from launcher.tasks import lean_loss
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, use_cache=False),
    attn_implementation="sdpa").train()
ids = torch.randint(0, 32000, (1, 2048))
batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "lean":
    loss = lean_loss.loss_sum(model, batch, chunk=256)
else:
    loss = model(**batch, num_items_in_batch=torch.tensor(1.0)).loss
loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, float(loss))
"""


def test_lean_loss_lowers_peak_memory():
    """32k vocabulary, 2,048 tokens: the model's own loss holds float32 logits, their
    log-probabilities and gradients (~250 MB each); the lean loss one 256-token chunk (33 MB)."""
    grow, loss = {}, {}
    for how in ("own", "lean"):
        out = subprocess.run([sys.executable, "-c", _LOSS_PROBE, how], capture_output=True, text=True, check=True,
                             cwd=ROOT, env={**__import__("os").environ, **OFFLINE_ENV})
        mb, value = out.stdout.strip().splitlines()[-1].split()
        grow[how], loss[how] = int(mb), float(value)
    print(f"peak RSS growth: {grow['own']} MB with the model's own loss, {grow['lean']} MB lean")
    assert loss["lean"] == pytest.approx(loss["own"], rel=1e-5)
    assert grow["lean"] < 0.5 * grow["own"], grow
