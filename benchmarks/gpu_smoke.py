"""The GPU smoke matrix: every engine on real GPUs, each case checked, one table at the end.

    python benchmarks/gpu_smoke.py                 # on a GPU machine (what CUDA shows decides the cases)
    python benchmarks/gpu_smoke.py --device cpu    # the same harness on CPU: tiny model, fp32, 2 gloo ranks

Workload: instruction fine-tuning with packing on a random Llama built from a config (no
download): on CUDA about 125M parameters (hidden 768, 12 layers, 12 heads, MLP 3072), bf16,
blocks of 512 tokens; on CPU a tiny one in fp32. Cases:

- 1 GPU: attention sdpa, and flash_attention_2 when flash-attn is installed;
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: cuda 40, cpu 12)")
    p.add_argument("--only", nargs="*", help="case names to run (default: all that this machine can)")
    args = p.parse_args(argv)
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if cuda else 0
    steps = args.steps or (40 if cuda else 12)
    base = workload(cuda, steps)
    out = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    todo = [c for c in cases(cuda, gpus) if not args.only or c[0] in args.only]
    where = f"{gpus} x {torch.cuda.get_device_name(0)}" if cuda else "CPU (gloo, fp32, tiny model)"
    print(f"{where}; {steps} steps per run; cases: {' '.join(c[0] for c in todo)}; runs under {out}", flush=True)
    results = []
    for i, (name, accel, extra) in enumerate(todo):
        r = run_case(name, accel, extra, base, out, cuda, 29400 + 10 * i)
        results.append(r)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "case"}
        print(f"{'PASS' if r['ok'] else 'FAIL'} {name}: {shown}", flush=True)
    print(json.dumps({"device": where, "steps": steps, "cases": results}))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
