"""The same tracking code against a real `mlflow server` on localhost, read back over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import FAST, TINY, check, launcher

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    # Its own process session: mlflow starts uvicorn and job-runner children that
    # outlive the main process unless the whole group is ended (NOTES.md).
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri, tmp_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        with pytest.raises(ProcessLookupError):  # the whole group is gone, children included
            for _ in range(50):
                os.killpg(proc.pid, 0)
                time.sleep(0.2)


def test_train_against_real_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, server_dir = mlflow_server
    # Credentials in the URI (the server ignores them) must not leak into prints, params or config.yaml.
    secret_uri = uri.replace("http://", "http://alice:s3cret-pw@")
    proc = check(launcher("train", str(TINY), "--output-dir", str(tmp_path / "runs"), "--run-name", "srv", *FAST,
                          "train.max_steps=8", "eval.every_steps=4", "checkpoint.every_steps=4", f"tracking.uri={secret_uri}",
                          "tracking.experiment=server-test"))
    assert "s3cret-pw" not in proc.stdout + proc.stderr and "alice:***@" in proc.stdout
    assert "s3cret-pw" not in (tmp_path / "runs" / "srv" / "config.yaml").read_text()
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing went to the default local store
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "srv"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/macro_f1")] == [0, 4, 8]
    assert run.data.params["train.max_steps"] == "8"
    assert not [k for k, v in run.data.params.items() if "s3cret-pw" in v]
    assert run.data.params["tracking.uri"] == secret_uri.replace("s3cret-pw", "***")
    assert {"config.yaml", "final_metrics.json", "training.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # The artifacts travelled over HTTP into the server's own store.
    assert list((server_dir / "server-artifacts").rglob("final_metrics.json"))
