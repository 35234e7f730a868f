"""Two CPU ranks over gloo with the real DDP engine (more engines arrive with the distributed issue)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, OFFLINE_ENV, ROOT, TINY, all_runs, check, mlflow_client

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_ddp_two_cpu_ranks(tmp_path):
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    proc = check(subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "launcher", "train", str(TINY),
         "--output-dir", str(tmp_path), "--run-name", "ddp", *FAST, "train.max_steps=12", "eval.every_steps=6",
         "checkpoint.every_steps=6"],
        cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=600))
    # Rank facts are true (not "rank 0 of 1" twice, NOTES.md) and only rank 0 prints.
    assert proc.stdout.count("run directory:") == 1
    assert "(2 process(es), MULTI_CPU" in proc.stdout
    assert "16 x 1 accumulation x 2 ranks" in proc.stdout  # global batch 32 kept, accumulation derived
    ckpt = tmp_path / "ddp" / "checkpoints" / "step-000012"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    client = mlflow_client(tmp_path)
    (run,) = all_runs(client)  # one run for the job, not one per rank
    assert run.data.tags["world_size"] == "2" and run.data.tags["distributed_type"] == "MULTI_CPU"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 13))
    # 100 validation rows over 2 ranks x 16 per batch: padded batches, yet each row counted once.
    assert json.loads((tmp_path / "ddp" / "final_metrics.json").read_text())["after"]["n"] == 100
