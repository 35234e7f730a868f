"""The same tracking code against a real `mlflow server` on localhost, read back over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import FAST, ROOT, TINY, check, launcher

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on localhost:port with its store under tmp_path; returns once /health answers."""
    log = open(tmp_path / "server.log", "a")
    # Its own process session: mlflow starts uvicorn and job-runner children that
    # outlive the main process unless the whole group is ended (NOTES.md).
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_server(proc)
            raise RuntimeError(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)


def _stop_server(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with pytest.raises(ProcessLookupError):  # the whole group is gone, children included
        for _ in range(50):
            os.killpg(proc.pid, 0)
            time.sleep(0.2)


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = _start_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}", tmp_path
    finally:
        _stop_server(proc)


def test_train_against_real_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, server_dir = mlflow_server
    # Credentials in the URI (the server ignores them) and tokens in the environment must not
    # leak into prints, params, tags or any file the run writes.
    secret_uri = uri.replace("http://", "http://alice:s3cret-pw@")
    tokens = {"HF_TOKEN": "hf_s3cret-tok", "WANDB_API_KEY": "wandb-s3cret-key", "MLFLOW_TRACKING_TOKEN": "mlf-s3cret-tok"}
    proc = check(launcher("train", str(TINY), "--output-dir", str(tmp_path / "runs"), "--run-name", "srv", *FAST,
                          "train.max_steps=8", "eval.every_steps=4", "checkpoint.every_steps=4", f"tracking.uri={secret_uri}",
                          "tracking.experiment=server-test", "tracking.register_model=clauses-tiny",
                          "tracking.system_metrics_every_s=1", env=tokens))
    assert "s3cret" not in proc.stdout + proc.stderr and "alice:***@" in proc.stdout
    assert "s3cret-pw" not in (tmp_path / "runs" / "srv" / "config.yaml").read_text()
    written = [f for f in (tmp_path / "runs").rglob("*") if f.is_file()]
    assert len(written) > 10 and not [f for f in written if b"s3cret" in f.read_bytes()]
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing went to the default local store
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "srv"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/macro_f1")] == [0, 4, 8]
    assert run.data.params["train.max_steps"] == "8"
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if "s3cret" in v]
    assert run.data.params["tracking.uri"] == secret_uri.replace("s3cret-pw", "***")
    assert {"config.yaml", "final_metrics.json", "training.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # The artifacts travelled over HTTP into the server's own store.
    assert list((server_dir / "server-artifacts").rglob("final_metrics.json"))

    # What MLflow users look for in a run: its data, its model, its machine.
    inputs = {(d.dataset.name, d.tags[0].value): d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {("train.jsonl", "training"), ("validation.jsonl", "validation")}
    assert json.loads(inputs["train.jsonl", "training"].profile)["num_rows"] == int(run.data.params["derived.n_train"])
    assert json.loads(inputs["validation.jsonl", "validation"].source)["uri"].endswith("validation.jsonl")
    exported = json.loads((tmp_path / "runs" / "srv" / "final_metrics.json").read_text())["exported_step"]
    (output,) = run.outputs.model_outputs
    assert output.step == exported
    model = client.get_logged_model(output.model_id)
    assert (model.name, model.status.name, model.source_run_id) == ("srv", "READY", run.info.run_id)
    import mlflow

    mlflow.set_tracking_uri(uri)
    fetched = Path(mlflow.artifacts.download_artifacts(f"models:/{output.model_id}", dst_path=str(tmp_path / "fetched")))
    local = tmp_path / "runs" / "srv" / "model"
    assert sorted(p.name for p in fetched.iterdir()) == sorted(p.name for p in local.iterdir())
    assert (fetched / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    (version,) = client.search_model_versions("name='clauses-tiny'")
    assert (version.version, version.run_id, version.source) == ("1", run.info.run_id, f"models:/{output.model_id}")
    assert "MLflow: registered model clauses-tiny version 1" in proc.stdout + proc.stderr
    assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")  # from rank 0, each second


def _wait_for(predicate, what: str, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def test_server_lost_mid_run_and_back(tmp_path):
    """The server is killed (SIGKILL, whole process group) after the run starts and stays
    down for every training step; training goes on with one warning, and once a new server
    answers on the same port and store, every queued step reaches the run, which ends
    FINISHED. Pausing the launcher (SIGSTOP) around the kill makes the order certain."""
    from mlflow.tracking import MlflowClient

    port, store = _free_port(), tmp_path / "server"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(store, port)
    out = open(tmp_path / "launcher.out", "w")
    steps = 30
    run = subprocess.Popen(
        [sys.executable, "-m", "launcher", "train", str(TINY), "--output-dir", str(tmp_path / "runs"), "--run-name", "lost",
         *FAST, f"train.max_steps={steps}", "eval.every_steps=10", "checkpoint.every_steps=10", "tracking.flush_every_steps=5",
         f"tracking.uri={uri}", "tracking.experiment=outage"],
        stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    text = lambda: (tmp_path / "launcher.out").read_text()  # noqa: E731
    try:
        client = MlflowClient(tracking_uri=uri)
        _wait_for(lambda: "first optimizer step done" in text(), "the first step (the MLflow run exists)", 300, run)
        run.send_signal(signal.SIGSTOP)
        _stop_server(server, signal.SIGKILL)
        run.send_signal(signal.SIGCONT)
        # Every step trains while the server is down; the finished run then waits for it.
        _wait_for(lambda: "tracking: waiting up to" in text(), "the end of training", 300, run)
        records = [json.loads(x) for x in (tmp_path / "runs" / "lost" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "train/loss" in r] == list(range(1, steps + 1))
        server = _start_server(store, port)
        assert run.wait(timeout=300) == 0, text()[-3000:]
        (mlrun,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        history = client.get_metric_history(mlrun.info.run_id, "train/loss")
        evals = [m.step for m in client.get_metric_history(mlrun.info.run_id, "eval/macro_f1")]
        artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    finally:
        if run.poll() is None:
            run.kill()
        out.close()
        _stop_server(server)
    log = text()
    assert log.count("is not answering") == 1, log  # one warning, not one per retry
    assert "answers again" in log and "were not sent" not in log
    assert mlrun.info.status == "FINISHED"
    assert sorted({m.step for m in history}) == list(range(1, steps + 1))  # no step lost
    assert len(history) == steps  # and none sent twice
    jsonl = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert all(abs(m.value - jsonl[m.step]) < 1e-6 for m in history)
    assert evals == [0, 10, 20, 30]
    exported = json.loads((tmp_path / "runs" / "lost" / "final_metrics.json").read_text())["exported_step"]
    assert mlrun.data.tags["exported.step"] == str(exported)  # logged after the outage
    assert {"config.yaml", "final_metrics.json", "training.png"} <= artifacts
