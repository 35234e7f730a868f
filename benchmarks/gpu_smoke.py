"""The GPU smoke matrix: every engine on real GPUs, each case checked, one table at the end.

    python benchmarks/gpu_smoke.py                 # on a GPU machine (what CUDA shows decides the cases)
    python benchmarks/gpu_smoke.py --device cpu    # the same harness on CPU: tiny model, fp32, 2 gloo ranks

Workload: instruction fine-tuning with packing on a random Llama built from a config (no
download): on CUDA about 125M parameters (hidden 768, 12 layers, 12 heads, MLP 3072), bf16,
blocks of 512 tokens; on CPU a tiny one in fp32. Cases:

- 1 GPU: attention sdpa, and flash_attention_2 when flash-attn is installed, with a check
  that a flattened packed micro-batch's per-example logits under flash attention equal
  each example's alone (the loss falling would not show examples attending to each other);
- 2+ GPUs (CPU: 2 gloo ranks): DDP, DeepSpeed ZeRO-2, ZeRO-3, and FSDP2.

Each case runs `launcher train` twice: uninterrupted, and halted at half the steps then
resumed (the same command again). It checks that the loss falls (last logged train loss
< 0.9 x the first), that the resumed run ends with the uninterrupted run's weights (max
|diff|: on CPU within 1e-5; GPU kernels are not bitwise deterministic, so on CUDA the figure
is reported and judged against 1e-2), and that the export loads (`launcher generate`). It
prints tokens/s, MFU and peak GPU memory from the run's metrics.jsonl. The last line is one
JSON object with every case. Not part of `make test`: nothing there needs a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCEL = ROOT / "configs" / "accelerate"
SFT = ROOT / "configs" / "train" / "sft_tiny.yaml"


def workload(cuda: bool, steps: int) -> list[str]:
    if cuda:  # ~125M parameters; packed 512-token blocks, 64 blocks per step
        model = ["model.tiny.hidden_size=768", "model.tiny.num_layers=12", "model.tiny.num_heads=12",
                 "model.tiny.intermediate_size=3072", "train.precision=bf16", "data.max_length=512",
                 "data.synthetic.n_train=40000", "train.global_batch_size=64", "train.micro_batch_size=8"]
    else:
        model = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "data.synthetic.n_train=256",
                 "train.global_batch_size=16", "train.micro_batch_size=4"]
    return [*model, "data.packing=true", f"train.max_steps={steps}", "train.warmup_steps=0", "eval.every_steps=0",
            "eval.at_start=false", f"checkpoint.every_steps={steps // 2}", "checkpoint.export=last",
            "eval.generation_prompts=[]", "data.synthetic.n_validation=64"]


def cases(cuda: bool, gpus: int) -> list[tuple[str, list[str], list[str]]]:
    """(name, accelerate launch arguments or [] for one plain process, extra overrides)."""
    out = []
    if cuda:
        out.append(("1gpu-sdpa", ["--config_file", str(ACCEL / "single_gpu.yaml")], ["model.attn_implementation=sdpa"]))
        if importlib.util.find_spec("flash_attn") is not None:
            out.append(("1gpu-flash", ["--config_file", str(ACCEL / "single_gpu.yaml")],
                        ["model.attn_implementation=flash_attention_2"]))
    else:
        out.append(("1proc-sdpa", [], ["model.attn_implementation=sdpa"]))
    n = gpus if cuda else 2
    if n >= 2:
        ddp = "multi_gpu.yaml" if cuda else "cpu_ddp.yaml"
        for name, yaml in (("ddp", ddp), ("zero2", "deepspeed_zero2.yaml"), ("zero3", "deepspeed_zero3.yaml"),
                           ("fsdp2", "fsdp2.yaml")):
            out.append((f"{n}x-{name}", ["--config_file", str(ACCEL / yaml), "--num_processes", str(n)], []))
    return out


def launch(accel: list[str], out: Path, run: str, args: list[str], port: int) -> subprocess.CompletedProcess:
    tail = ["-m", "launcher", "train", str(SFT), "--output-dir", str(out), "--run-name", run, *args]
    cmd = ([sys.executable, "-m", "accelerate.commands.launch", *accel, "--main_process_port", str(port), *tail]
           if accel else [sys.executable, *tail])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def run_case(name, accel, extra, base, out: Path, cuda: bool, port: int) -> dict:
    t = time.time()
    result: dict = {"case": name}
    full = launch(accel, out, f"{name}-full", base + extra, port)
    if full.returncode:
        return result | {"ok": False, "error": (full.stderr or full.stdout).strip().splitlines()[-1:]}
    records = [json.loads(x) for x in (out / f"{name}-full" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    steady = train[1:] or train
    result["loss_first"], result["loss_last"] = train[0]["train/loss"], train[-1]["train/loss"]
    result["tokens_per_s"] = statistics.median(r["train/tokens_per_s"] for r in steady)
    if any("train/mfu" in r for r in steady):
        result["mfu"] = statistics.median(r["train/mfu"] for r in steady if "train/mfu" in r)
    if any("train/gpu_mem_peak_gb" in r for r in steady):
        result["gpu_mem_peak_gb"] = max(r["train/gpu_mem_peak_gb"] for r in steady if "train/gpu_mem_peak_gb" in r)
    steps = int(next(a for a in base if a.startswith("train.max_steps=")).split("=")[1])
    halted = launch(accel, out, f"{name}-halt", base + extra + [f"train.halt_at_step={steps // 2}"], port + 1)
    resumed = launch(accel, out, f"{name}-halt", base + extra, port + 2) if halted.returncode == 0 else halted
    if resumed.returncode or "resuming from" not in resumed.stdout:
        return result | {"ok": False, "error": ["halt/resume failed", *(resumed.stderr or resumed.stdout).strip().splitlines()[-1:]]}
    result["resume_max_abs_diff"] = max_diff(out / f"{name}-full", out / f"{name}-halt")
    gen = subprocess.run([sys.executable, "-m", "launcher", "generate", str(out / f"{name}-full" / "model"),
                          "--prompt", "What is the code word for amber zephyr?", "--max-new-tokens", "4"],
                         cwd=ROOT, capture_output=True, text=True)
    result["export_loads"] = gen.returncode == 0
    tol = 1e-2 if cuda else 1e-5
    result["ok"] = (result["loss_last"] < 0.9 * result["loss_first"] and result["resume_max_abs_diff"] < tol
                    and result["export_loads"])
    result["seconds"] = round(time.time() - t, 1)
    return result


def flash_packing_case() -> dict:
    """bf16 tiny Llama under flash attention: two packed rows (micro-batch 2) collated as a
    training step sees them (flattened, cu_seq_lens) give each example the logits it has
    alone (flash attention on the unpadded example). bf16 kernels differ by ulps between
    sequence lengths, so the bound is 2e-2 on logits of order 1."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from launcher.data.instructions import LMCollator

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, use_cache=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flash_attention_2", dtype=torch.bfloat16).cuda().eval()
    examples = [torch.randint(1, 512, (n,)).tolist() for n in (37, 64, 11, 90, 23)]
    rows = [{"input_ids": sum(examples[:3], []), "labels": sum(examples[:3], []), "seq_lens": [37, 64, 11]},
            {"input_ids": sum(examples[3:], []), "labels": sum(examples[3:], []), "seq_lens": [90, 23]}]
    batch = LMCollator(0, packed=True, flatten=True)(rows)
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        flat = model(**inputs).logits[0].float()
        worst, start = 0.0, 0
        for x in examples:
            alone = model(input_ids=torch.tensor([x], device="cuda")).logits[0].float()
            worst = max(worst, float((flat[start : start + len(x)] - alone).abs().max()))
            start += len(x)
    return {"case": "1gpu-flash-packed-logits", "max_abs_diff": worst, "ok": worst < 2e-2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: cuda 40, cpu 12)")
    p.add_argument("--only", nargs="*", help="case names to run (default: all that this machine can; an unknown name lists them)")
    args = p.parse_args(argv)
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if cuda else 0
    steps = args.steps or (40 if cuda else 12)
    base = workload(cuda, steps)
    out = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    every = cases(cuda, gpus)
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    known = [c[0] for c in every] + (["1gpu-flash-packed-logits"] if flash else [])
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:  # (nothing ran, and the empty run passed)
        p.error(f"--only: {', '.join(unknown)} not among this machine's cases: {' '.join(known)}")
    todo = [c for c in every if not args.only or c[0] in args.only]
    where = f"{gpus} x {torch.cuda.get_device_name(0)}" if cuda else "CPU (gloo, fp32, tiny model)"
    print(f"{where}; {steps} steps per run; cases: {' '.join(c[0] for c in todo)}; runs under {out}", flush=True)
    results = []
    if flash and (not args.only or "1gpu-flash-packed-logits" in args.only):
        r = flash_packing_case()
        results.append(r)
        print(f"{'PASS' if r['ok'] else 'FAIL'} {r['case']}: max |diff| {r['max_abs_diff']:.4g}", flush=True)
    for i, (name, accel, extra) in enumerate(todo):
        r = run_case(name, accel, extra, base, out, cuda, 29400 + 10 * i)
        results.append(r)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "case"}
        print(f"{'PASS' if r['ok'] else 'FAIL'} {name}: {shown}", flush=True)
    print(json.dumps({"device": where, "steps": steps, "cases": results}))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
