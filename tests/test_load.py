"""Many jobs at once on what a team shares: one real MLflow server and one data cache.

Four jobs of 2 DDP ranks each (8 training processes on this machine's 2 cores, one thread
each), two of them talking to the server through a proxy that answers every request 1 s
late, one of those killed with SIGKILL after its first checkpoint and started again. Every
job must finish, every MLflow run must hold each of its steps exactly once, the shared cache
must be built once, and nobody may wait on a lock past its deadline. Not in `make test`
(about 4 minutes): `make test-load`. The speed effect of the latency is measured by
benchmarks/tracker_latency.py."""

from __future__ import annotations

import json
import signal
import statistics
import time

import psutil
import pytest

from conftest import check, launcher
from latency_proxy import LatencyProxy
from test_distributed import ACCEL, accelerate_launch, free_port
from test_mlflow_server import _start_server, _stop_server

pytestmark = [pytest.mark.load, pytest.mark.slow, pytest.mark.distributed, pytest.mark.server]

STEPS = 30
MODEL = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.vocab_size=400"]


def _kill_tree(proc) -> None:
    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.communicate(timeout=60)


def test_four_jobs_share_one_tracker_and_one_cache_without_a_lost_step(tmp_path):
    port = free_port()
    server = _start_server(tmp_path, port)
    direct = f"http://127.0.0.1:{port}"
    try:
        _run_and_check(tmp_path, direct)
    finally:  # whatever failed, the server goes (it would outlive the test)
        _stop_server(server)


def _run_and_check(tmp_path, direct: str) -> None:
    slow = LatencyProxy(direct, delay_s=1.0)
    try:
        check(launcher("synth", str(tmp_path / "data"), "--n-train", "384", "--n-validation", "100"))
        common = ["data.synthetic.enabled=false", f"data.train_file={tmp_path / 'data' / 'train.jsonl'}",
                  f"data.validation_file={tmp_path / 'data' / 'validation.jsonl'}", f"data.cache_dir={tmp_path / 'cache'}",
                  *MODEL, f"train.max_steps={STEPS}", "eval.every_steps=10", "checkpoint.every_steps=10",
                  "tracking.experiment=load", "tracking.system_metrics_every_s=2"]
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        launch = ["--config_file", str(ACCEL / "cpu_ddp.yaml")]
        uris = {"j0": direct, "j1": direct, "j2": slow.url, "j3": slow.url}

        def start(name):
            return accelerate_launch(launch, tmp_path / "runs", name, *common, f"tracking.uri={uris[name]}",
                                     base=[], env=env, wait=False)

        started = time.monotonic()
        procs = {name: start(name) for name in uris}
        sealed = tmp_path / "runs" / "j3" / "checkpoints" / "step-000010" / "COMPLETE"
        while not sealed.is_file():
            assert procs["j3"].poll() is None and time.monotonic() - started < 600, procs["j3"].communicate()[1][-5000:]
            time.sleep(0.1)
        _kill_tree(procs["j3"])  # a lost node, mid-run
        procs["j3"] = start("j3")  # its requeue
        outs = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, (name, err[-3000:])
            outs[name] = out + err
        wall = time.monotonic() - started
    finally:
        slow.close()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=direct)
    runs = client.search_runs([client.get_experiment_by_name("load").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["j0", "j1", "j2", "j3"]  # one run per job, the killed one too
    step_times = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_name
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, STEPS + 1)), (run.info.run_name, steps)  # each once, none lost
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/macro_f1")] == [0, 10, 20, 30]
        step_times[run.info.run_name] = statistics.median(
            m.value for m in client.get_metric_history(run.info.run_id, "train/step_time_s"))
    assert {r.info.run_name: r.data.tags["launcher.attempts"] for r in runs}["j3"] == "2"
    assert "resuming from" in outs["j3"]
    # The cache: one tokenizer and one token entry per split, built by one process for all jobs.
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir() and "-" in p.name)
    assert entries == ["tokenizer", "tokens", "tokens"], entries
    # Who built each split: the entry names its builder's pid; every rank file of the jobs' last
    # attempts that says it tokenized a split must be that process, and if none says so the
    # builder was j3's killed first attempt (whose rank files its requeue rewrote).
    ranks = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("j*/ranks/rank-*.json")]
    assert len(ranks) == 8, len(ranks)
    for entry in (tmp_path / "cache").glob("tokens-*"):
        record = json.loads((entry / "launcher-key.json").read_text())
        split = "validation" if "validation.jsonl" in json.dumps(record["key"]) else "train"
        builder = record["built_by"]["pid"]
        claimed = {r["pid"] for r in ranks if r["tokenized_here"][split]}
        assert claimed == {builder} & {r["pid"] for r in ranks}, (split, builder, claimed)
    assert not any("taking over" in out or "waiting" in out and "lock" in out for out in outs.values())
    print(f"\n4 jobs x 2 ranks, one killed and resumed: {wall:.0f} s; cache entries {entries}; "
          f"median step time (s): {json.dumps({k: round(v, 3) for k, v in sorted(step_times.items())})}; "
          f"requests through the 1 s proxy: {slow.requests}")
