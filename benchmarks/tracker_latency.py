"""Does a slow tracking server slow training? The same run against one real `mlflow server`,
directly and through a proxy that answers every request 1 s late (tests/latency_proxy.py),
interleaved over rounds (A B, A B, ...) so machine noise lands on both alike.

Reported per arm (medians over rounds): the median optimizer-step time the run measured
(train/step_time_s: training speed), the time from the first optimizer step to the last
(metrics.jsonl's clock is the run's own: first and last train records), and the wall time of
the whole command (start-up and the end's wait for the queue to drain included).

    .venv/bin/python benchmarks/tracker_latency.py            # 3 rounds, 300 steps (~5 min on 2 cores)
    .venv/bin/python benchmarks/tracker_latency.py --rounds 1 --steps 100

The last line printed is one JSON object with every figure. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from latency_proxy import LatencyProxy  # noqa: E402

PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(PY).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
                             "--artifacts-destination", str(work / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def one_run(work: Path, name: str, uri: str, steps: int) -> dict:
    cmd = [PY, "-m", "launcher", "train", str(ROOT / "configs" / "train" / "clause_tiny.yaml"), "--output-dir", str(work),
           "--run-name", name, f"train.max_steps={steps}", f"eval.every_steps={steps // 3}",
           f"checkpoint.every_steps={steps // 3}", f"tracking.uri={uri}", "tracking.experiment=latency"]
    started = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, text=True)
    wall = time.monotonic() - started
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/step_time_s" in r]
    return {"step_time_s": statistics.median(r["train/step_time_s"] for r in train),
            "train_s": sum(r["train/step_time_s"] for r in train), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--delay-s", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        work = Path(tmp)
        server, url = start_server(work)
        proxy = LatencyProxy(url, args.delay_s)
        results: dict[str, list[dict]] = {"direct": [], "slow": []}
        try:
            for r in range(args.rounds):
                for arm, uri in (("direct", url), ("slow", proxy.url)):
                    results[arm].append(one_run(work, f"{arm}-{r}", uri, args.steps))
                    print(f"round {r} {arm}: " + json.dumps({k: round(v, 4) for k, v in results[arm][-1].items()}),
                          flush=True)
        finally:
            proxy.close()
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    med = {arm: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for arm, runs in results.items()}
    summary = {"delay_s": args.delay_s, "steps": args.steps, "rounds": args.rounds, "requests_through_proxy": proxy.requests,
               **{f"{arm}_{k}": round(v, 4) for arm, m in med.items() for k, v in m.items()},
               "step_time_ratio_slow_over_direct": round(med["slow"]["step_time_s"] / med["direct"]["step_time_s"], 3),
               "train_time_ratio_slow_over_direct": round(med["slow"]["train_s"] / med["direct"]["train_s"], 3),
               "wall_extra_s": round(med["slow"]["wall_s"] - med["direct"]["wall_s"], 1)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
