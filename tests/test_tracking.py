"""The tracker's sender thread: calls in order, merged metric batches, one warning per
outage, every queued call delivered once the tracker answers again, and a bounded wait."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY, wandb_records
from launcher.tracking import Sender, wandb_rows


class Flaky:
    """A tracker endpoint that refuses connections while `down` is set."""

    def __init__(self):
        self.down = threading.Event()
        self.batches: list[list] = []
        self.calls: list[str] = []

    def metrics(self, values):
        if self.down.is_set():
            raise ConnectionRefusedError(111, "Connection refused")
        self.batches.append(list(values))

    def call(self, name):
        def fn():
            if self.down.is_set():
                raise ConnectionRefusedError(111, "Connection refused")
            self.calls.append(name)
        return fn


def test_outage_queues_in_order_warns_once_and_delivers_everything():
    server, lines = Flaky(), []
    sender = Sender("test server", server.metrics, max_backoff_s=0.2, say=lines.append)
    sender.put_metrics([1, 2])
    assert sender.drain(5)
    server.down.set()
    for step in range(3, 40):
        sender.put_metrics([step])
    sender.put_call("params", server.call("params"))
    sender.put_metrics([40])
    time.sleep(1.0)  # several retries while down
    assert not sender.drain(0.3)
    assert [x for x in lines if "not answering" in x] == [lines[0]] and len(lines) == 1
    server.down.clear()
    assert sender.drain(10)
    sender.close()
    sent = [v for b in server.batches for v in b]
    assert sent == list(range(1, 41))  # nothing lost, nothing twice, in order
    assert server.calls == ["params"]
    # metrics queued before the call went in one merged batch, before it; the rest after it
    assert [3, 4, 5] == server.batches[1][:3] and server.batches[-1] == [40]
    assert any("answers again" in x for x in lines) and len(lines) == 2


def test_refused_call_is_dropped_with_a_warning_and_the_rest_goes_on():
    class Refused(Exception):
        error_code = "INVALID_PARAMETER_VALUE"

    got, lines = [], []

    def bad():
        raise Refused("param changed")

    sender = Sender("test server", got.extend, say=lines.append)
    sender.put_call("params", bad)
    sender.put_metrics([1])
    assert sender.drain(5)
    sender.close()
    assert got == [1] and len(lines) == 1 and "refused params" in lines[0]


def test_drain_gives_up_at_its_deadline_and_close_stops_the_thread():
    server, lines = Flaky(), []
    server.down.set()
    sender = Sender("test server", server.metrics, max_backoff_s=0.1, say=lines.append)
    sender.put_metrics([1])
    t = time.monotonic()
    assert not sender.drain(0.5)
    assert time.monotonic() - t < 10  # the server stays down: without the deadline this never returns
    sender.close()
    sender.thread.join(5)
    assert not sender.thread.is_alive() and server.batches == []


def test_a_busy_server_is_reachable_a_closed_port_is_not(tmp_path):
    """Connecting is one deadline, the answer another: a server that accepts the connection
    and answers 2 s later passes a 1 s connect deadline (a team's server under load); a
    closed port fails at once with one line."""
    import socket
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from launcher.config import load_config
    from launcher.errors import ConfigError
    from launcher.tracking import Setup, check_reachable

    answered = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(2.0)
            answered.set()  # before the answer leaves, so the client cannot see it first
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = load_config(str(TINY), [f"tracking.uri=http://127.0.0.1:{server.server_address[1]}"], output_dir=str(tmp_path))
        check_reachable(Setup.of(cfg), timeout_s=1.0)
        assert answered.is_set()  # it waited past the 1 s connect deadline for the answer
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = load_config(str(TINY), [f"tracking.uri=http://127.0.0.1:{closed}"], output_dir=str(tmp_path))
    # Refused, not timed out: the connection attempt's own answer, not the deadline's.
    with pytest.raises(ConfigError, match=rf"tracking.uri: http://127.0.0.1:{closed} does not answer \(Connection refused\)"):
        check_reachable(Setup.of(cfg), timeout_s=1.0)


def test_a_finished_run_waits_for_calls_that_keep_succeeding_not_only_outage_wait_s():
    """A multi-GB model upload outlasting tracking.outage_wait_s was cut off at the end (the run
    left RUNNING, "did not answer" printed); only time the server does not answer counts now."""
    got, lines = [], []

    def slow(values):
        time.sleep(0.4)
        got.extend(values)

    sender = Sender("test server", slow, say=lines.append)
    for step in range(4):
        sender.put_call(f"part {step}", lambda step=step: slow([step]))
    assert not sender.drain(0.5)  # the whole wait as a deadline: cut off mid-upload
    assert sender.drain(0.5, while_down=True) and got == [0, 1, 2, 3] and not lines
    sender.close()
    server = Flaky()  # a server that is down still ends the wait at the deadline
    server.down.set()
    down = Sender("test server", server.metrics, max_backoff_s=0.1, say=lines.append)
    down.put_metrics([1])
    t = time.monotonic()
    assert not down.drain(0.5, while_down=True) and time.monotonic() - t < 10
    down.close()
    # A call that hangs without failing (a hung file system) is waited for WHILE_UP_CAP timeouts, no more.
    from launcher.tracking import WHILE_UP_CAP

    release = threading.Event()
    hung = Sender("test server", lambda values: release.wait(30), say=lines.append)
    hung.put_metrics([1])
    t = time.monotonic()
    assert not hung.drain(0.2, while_down=True)
    assert WHILE_UP_CAP * 0.2 <= time.monotonic() - t < 10
    release.set()
    hung.close()


def test_mlflow_gets_every_value_of_a_batch_holding_a_name_it_refuses(tmp_path):
    """Per-class metric names come from the data (an SFT run's closed answers, label names);
    MLflow refuses a whole batch for one name with a comma or a '?', so the training loss
    merged into that batch was lost at each evaluation. Names are made MLflow's: the batch
    arrives whole."""
    from mlflow.tracking import MlflowClient

    from launcher.tracking import MLflowTracker, mlflow_key

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(uri, "exp", "run", None, (tmp_path / "art").as_uri(), {})
    for step in (1, 2):
        tracker.log_metrics({"train/loss": 1.0 / step, "eval/f1/yes, with notice?": 0.5, "eval/f1/..": 0.25,
                             "eval/f1/yes; with notice?": 0.75}, step)
        tracker.flush()
    tracker.finish()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(tracker.run_id, "train/loss")] == [1.0, 0.5]
    assert set(run.data.metrics) == {"train/loss", mlflow_key("eval/f1/yes, with notice?"), mlflow_key("eval/f1/.."),
                                     mlflow_key("eval/f1/yes; with notice?")}  # two names that differ stay two
    assert run.data.metrics[mlflow_key("eval/f1/yes; with notice?")] == 0.75


def test_a_line_cut_short_by_a_killed_attempt_does_not_stop_the_resume(tmp_path, capsys):
    """metrics.jsonl is written through a buffer: a kill -9 or a lost node can leave its last
    line cut, or zeros. Resuming read every line with json.loads and failed with a traceback,
    at every retry. Now the cut line is skipped with a warning and the next record starts on a
    line of its own."""
    from launcher.tracking import JsonlTracker

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n{"step": 3, "train/lo')
    tracker = JsonlTracker(path, resume_step=2)
    tracker.log_metrics({"train/loss": 1.25}, 3)
    assert [r["step"] for r in tracker.records()] == [1, 2, 3]
    tracker.finish()
    assert "1 line(s) cut short" in capsys.readouterr().err
    path.write_bytes(path.read_bytes() + b'{"step": 4, "tr' + b"\0" * 16)  # restarted in place: nothing kept
    again = JsonlTracker(path, resume_step=None)
    again.log_metrics({"train/loss": 1.0}, 4)
    assert [r["step"] for r in again.records()] == [1, 2, 3, 4]
    again.finish()


def test_a_server_on_a_private_ca_is_reachable_and_a_racing_experiment_is_found(tmp_path, monkeypatch):
    """The start's reachability check trusts only the system's CAs: a team server whose
    certificate a private CA signed (which the MLflow client trusts through REQUESTS_CA_BUNDLE)
    failed every start with "does not answer". A TLS handshake is an answer now. And jobs of
    an array creating one experiment together: the one that lost the race failed its start."""
    import ssl
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from launcher.config import load_config
    from launcher.tracking import MLflowTracker, Setup, check_reachable

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=team-mlflow",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = load_config(str(TINY), [f"tracking.uri=https://127.0.0.1:{server.server_address[1]}"], output_dir=str(tmp_path))
        check_reachable(Setup.of(cfg), timeout_s=2.0)
    finally:
        server.shutdown()
        server.server_close()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowTracker(uri, "sweep", "a", None, None, {})
    from mlflow.tracking import MlflowClient

    real = MlflowClient.get_experiment_by_name
    calls = []

    def late(self, name):  # the other job created it just after this one looked
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", late)
    second = MLflowTracker(uri, "sweep", "b", None, None, {})
    assert second.experiment_id == first.experiment_id and len(calls) == 2
    first.finish()
    second.finish()


def test_a_call_failing_for_an_unknown_reason_is_dropped_after_a_few_tries_and_metrics_go_on():
    """An artifact store without credentials (botocore's NoCredentialsError) or a proxy's 413
    is neither an outage nor an answer MLflow names as final: it was retried forever at the
    head of the queue, so every metric queued behind it waited for the rest of the run. Now
    it is dropped after UNKNOWN_TRIES with one warning; a 503 is still retried until it passes."""
    from launcher.tracking import UNKNOWN_TRIES

    class NoCredentialsError(Exception):
        pass

    class Unavailable(Exception):
        def __init__(self):
            super().__init__("503 Server Error")
            self.response = type("Response", (), {"status_code": 503})()

    got, lines, tries = [], [], {"table": 0, "params": 0}

    def table():
        tries["table"] += 1
        raise NoCredentialsError("Unable to locate credentials")

    def params():
        tries["params"] += 1
        if tries["params"] <= 2:
            raise Unavailable()
        got.append("params")

    sender = Sender("test server", got.extend, max_backoff_s=0.05, say=lines.append)
    sender.put_call("table samples", table)
    sender.put_metrics([1, 2])
    sender.put_call("params", params)
    assert sender.drain(30)
    sender.close()
    assert got == [1, 2, "params"] and tries == {"table": UNKNOWN_TRIES, "params": 3}
    refused = [x for x in lines if "refused" in x]
    assert len(refused) == 1 and f"refused table samples after {UNKNOWN_TRIES} tries" in refused[0], lines
    # A server that answers "no" is no outage: the refusal is said once, not "not answering"
    # (which also made checkpoints skip their wait for the queue); the 503 is the one outage.
    assert [x for x in lines if "not answering" in x] == [lines[1]] and "(Unavailable)" in lines[1], lines
    assert len(lines) == 3 and "answers again" in lines[2] and sender.outages == 1 and sender.down_since is None, lines


def test_mlflow_system_metrics_warnings_never_show_the_uris_password(tmp_path, caplog):
    """MLflow's system-metrics monitor logs "Failed to get mlflow run: {error}" when the server
    does not answer, and MLflow's error carries the full URL, password included."""
    import logging

    from launcher.tracking import RedactingFilter

    uri = "http://alice:s3cret-pw@mlflow.internal:5000"
    monitor = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    redacting = RedactingFilter(uri)
    monitor.addFilter(redacting)
    try:
        with caplog.at_level(logging.WARNING):
            monitor.warning("Failed to get mlflow run: API request to %s/api/2.0/mlflow/runs/get failed.", uri)
    finally:
        monitor.removeFilter(redacting)
    (record,) = caplog.records
    assert "s3cret-pw" not in record.getMessage() and "mlflow.internal:5000" in record.getMessage()
    # The tracker puts it there when it starts the monitor.
    from launcher.tracking import MLflowTracker

    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "run", None, None, {}, system_metrics_every_s=1.0)
    try:
        assert tracker.system is not None and any(isinstance(f, RedactingFilter) for f in monitor.filters)
    finally:
        tracker.finish()


def test_an_end_cut_off_while_the_server_answers_says_so_not_that_it_did_not_answer(tmp_path):
    """A finished run waits for calls that keep going up to WHILE_UP_CAP x outage_wait_s; when
    that cap ran out the line said the server "did not answer within" outage_wait_s, sending
    the user to look for an outage that never was."""
    from launcher.tracking import WHILE_UP_CAP, MLflowTracker

    lines: list[str] = []
    release = threading.Event()
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "run", None, None, {}, outage_wait_s=0.2)
    tracker.sender.say = lines.append
    tracker.sender.put_call("the model", lambda: release.wait(30))  # an upload on a hung file system
    try:
        tracker.finish()
    finally:
        release.set()
    (line,) = [x for x in lines if x.startswith("warning")]
    assert f"was still taking calls after {WHILE_UP_CAP * 0.2:.0f} s" in line and "did not answer" not in line, line


def test_system_metrics_start_again_after_mlflows_monitor_ended_on_an_error(tmp_path, monkeypatch):
    """MLflow's system-metrics monitor returns from its thread at its first failed call (one
    outage), and the run logged no system metrics for the rest of its days. While the server
    answers, the tracker starts it again at its next flush, and it goes on from the run's steps."""
    from mlflow.tracking import MlflowClient

    from launcher import tracking

    monkeypatch.setattr(tracking, "REVIVE_SYSTEM_METRICS_S", 0.0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.MLflowTracker(uri, "exp", "run", None, None, {}, system_metrics_every_s=0.3)
    key = "system/cpu_utilization_percentage"

    def steps() -> list[int]:
        return sorted(m.step for m in MlflowClient(uri).get_metric_history(tracker.run_id, key))

    try:
        deadline = time.monotonic() + 30
        while not steps() and time.monotonic() < deadline:
            time.sleep(0.2)
        first = tracker.system
        first._shutdown_event.set()  # its thread returns, as it does after a failed call
        first._process.join(30)
        before = steps()
        assert before and not first._process.is_alive()
        # Behind a slow call (a queue draining after an outage), flushes queue one start, not one each.
        release = threading.Event()
        tracker.sender.put_call("a slow upload", lambda: release.wait(30))
        tracker.flush()
        tracker.flush()
        with tracker.sender.cond:
            starts = [item for item in tracker.sender.queue if item[0] == "call" and item[1] == "system metrics"]
        release.set()
        assert len(starts) == 1
        tracker.flush(wait=True)
        assert tracker.system is not first and tracker.system._process.is_alive()
        deadline = time.monotonic() + 30
        while len(steps()) <= len(before) and time.monotonic() < deadline:
            time.sleep(0.2)
        after = steps()
        assert len(after) > len(before) and after == sorted(set(after)) and after[: len(before)] == before, (before, after)
    finally:
        tracker.finish()
    assert tracker.system is None


def test_a_long_outage_keeps_the_newest_metrics_up_to_the_cap_and_says_so_once():
    """Every metric value waited in memory for as long as the server was down: a days-long
    outage grew the queue without end. Past max_queued the oldest batches go, with one warning;
    the newest arrive in order when the server answers; calls are never dropped for room."""
    server, lines = Flaky(), []
    server.down.set()
    sender = Sender("test server", server.metrics, max_backoff_s=0.05, say=lines.append, max_queued=10)
    sender.put_call("params", server.call("params"))
    for step in range(8):
        sender.put_metrics([(step, 0), (step, 1), (step, 2)])
    assert sender.pending_metrics() <= 10
    deadline = time.monotonic() + 30
    while sender.down_since is None and time.monotonic() < deadline:  # the outage seen
        time.sleep(0.01)
    server.down.clear()
    assert sender.drain(30)
    sender.close()
    got = [v for batch in server.batches for v in batch]
    assert server.calls == ["params"] and got == [(s, k) for s in range(5, 8) for k in range(3)], got
    assert sum("oldest are dropped" in x for x in lines) == 1 and "15 older ones were dropped" in lines[-1], lines
    assert sender.pending_metrics() == 0


def test_a_resumed_run_s_generations_table_in_mlflow_is_the_local_record(tmp_path):
    """An attempt evaluates steps 0, 2 and 4 and is killed past its step-2 checkpoint; the
    resumed attempt evaluates 4 again with other answers, then 6. MLflow's table appended each
    evaluation's rows, so step 4 was there twice; now the table is generations.jsonl's rows,
    and the MLflow UI still lists it as a table."""
    from mlflow.tracking import MlflowClient

    from launcher import report
    from launcher.tracking import MLflowTracker

    uri, run_dir = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    run_dir.mkdir()
    first = MLflowTracker(uri, "exp", "run", None, (tmp_path / "art").as_uri(), {})
    for step in (0, 2, 4):
        report.record_generations(run_dir, step, [{"prompt": p, "response": f"{p} at {step}"} for p in ("a", "b")], first)
    first.flush(wait=True)
    resumed = MLflowTracker(uri, "exp", "run", first.run_id, None, {})
    assert resumed.run_id == first.run_id
    for step in (4, 6):
        report.record_generations(run_dir, step, [{"prompt": p, "response": f"{p} again at {step}"} for p in ("a", "b")], resumed)
    resumed.finish()
    client = MlflowClient(tracking_uri=uri)
    table = json.loads(Path(client.download_artifacts(first.run_id, "generations.json", str(tmp_path))).read_text())
    logged = [dict(zip(table["columns"], row)) for row in table["data"]]
    local = [json.loads(x) for x in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert logged == local and [r["step"] for r in logged] == [0, 0, 2, 2, 4, 4, 6, 6]
    assert logged[4]["response"] == "a again at 4"
    tags = json.loads(client.get_run(first.run_id).data.tags["mlflow.loggedArtifacts"])
    assert tags == [{"path": "generations.json", "type": "table"}]


def test_a_stopped_run_is_preempted_in_wandb_a_failed_one_failed(tmp_path, monkeypatch):
    """A run stopped with a checkpoint to resume from (SIGTERM, a preemption, a stop file; KILLED
    in MLflow) ended with exit code 1, which W&B shows as failed. It is marked preempting first,
    W&B's state for a run that stopped to be resumed; a failed run is not, a finished one exits 0."""
    from launcher.tracking import WandbTracker

    monkeypatch.setenv("WANDB_SILENT", "true")
    ended = {}
    for status in ("KILLED", "FAILED", "FINISHED"):
        tracker = WandbTracker("p", status, None, "offline", tmp_path / status, {})
        tracker.log_metrics({"train/loss": 1.0}, 1)
        tracker.finish(status)
        (log,) = (tmp_path / status).glob("wandb/offline-run-*/run-*.wandb")
        deadline = time.monotonic() + 60  # wandb's service may still be writing the file after finish()
        while not (records := wandb_records(log)) or records[-1].WhichOneof("record_type") != "exit":
            assert time.monotonic() < deadline, [r.WhichOneof("record_type") for r in records]
            time.sleep(0.5)
        ended[status] = (any(r.HasField("preempting") for r in records), records[-1].exit.exit_code)
    assert ended == {"KILLED": (True, 1), "FAILED": (False, 1), "FINISHED": (False, 0)}


def test_wandb_plots_every_metric_on_the_run_s_own_step_axis(tmp_path, monkeypatch):
    """W&B drops a log at an internal step below its last one, so a resumed run's re-run steps
    kept the killed attempt's values there. Every metric now carries the optimizer step as
    train/global_step, the axis all metrics are defined on (W&B's way to log to earlier steps):
    an attempt that logs steps 2-3 again after 1-3 has all its points, at their steps."""
    from launcher.tracking import WandbTracker

    monkeypatch.setenv("WANDB_SILENT", "true")
    first = WandbTracker("p", "r", None, "offline", tmp_path, {})
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": 1.0 / step}, step)
    first.log_metrics({"eval/loss": 0.5}, 3)
    first.finish()
    again = WandbTracker("p", "r", first.run_id, "offline", tmp_path, {})
    for step in (2, 3):
        again.log_metrics({"train/loss": 2.0 / step}, step)
    again.log_table([{"step": 3, "prompt": "a", "response": "b"}], "generations", 3)
    again.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    for run, logged in zip(runs, ([(1, "train/loss"), (2, "train/loss"), (3, "train/loss"), (3, "eval/loss")],
                                  [(2, "train/loss"), (3, "train/loss"), (3, "generations")])):
        (log,) = run.glob("run-*.wandb")
        deadline = time.monotonic() + 60  # wandb's service may still be writing the file after finish() (seen in CI)
        while True:
            records = wandb_records(log)
            axes = {(m.metric.glob_name or m.metric.name, m.metric.step_metric) for m in records if m.HasField("metric")}
            written = sum(r.HasField("history") for r in records)
            if (("*", "train/global_step") in axes and written >= len(logged)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ("*", "train/global_step") in axes and ("train/global_step", "") in axes, (log.stat().st_size, len(records))
        rows = wandb_rows(records)
        def logged_as(row: dict) -> str:  # a table is logged as several keys: generations/_type, /sha256, ...
            (name,) = {k.split("/")[0] if k.startswith("generations/") else k for k in row
                       if not k.startswith("_") and k != "train/global_step"}
            return name

        assert [(int(r["train/global_step"]), logged_as(r)) for r in rows] == logged


def test_a_derived_value_is_recorded_where_it_changed_and_not_at_each_requeue(tmp_path):
    """MLflow keeps a param's first value: an extension (12 -> 18 steps, resumed at 6) records
    resumed_at_6.derived.total_steps; a requeue at 12 with nothing changed records nothing (it
    compared with the first value and claimed the change again); another extension at 15 records
    18 -> 24, from the value as the run stood."""
    from mlflow.tracking import MlflowClient

    from launcher.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowTracker(uri, "exp", "run", None, None, {})
    first.log_params({"derived.total_steps": 12, "train.lr": 0.001})
    first.finish()
    for resumed_at, total in ((6, 18), (12, 18), (15, 24)):
        again = MLflowTracker(uri, "exp", "run", first.run_id, None, {})
        again.log_params({"derived.total_steps": total, "train.lr": 0.001}, resumed_at=resumed_at)
        again.finish()
    params = MlflowClient(tracking_uri=uri).get_run(first.run_id).data.params
    assert {k: v for k, v in params.items() if "total_steps" in k} == {
        "derived.total_steps": "12", "resumed_at_6.derived.total_steps": "12 -> 18",
        "resumed_at_15.derived.total_steps": "18 -> 24"}


def test_two_attempts_changing_a_key_at_the_same_step_both_stay_in_mlflow(tmp_path):
    """Killed before its next checkpoint and resumed again from the same one, another attempt
    changes the same key at the same step: its resumed_at_6.<key> was dropped (MLflow keeps a
    param's first value), and the run read the first attempt's value as current. It goes in
    as resumed_at_6_2.<key>; sent again (a requeue, the config history), nothing is added."""
    from mlflow.tracking import MlflowClient

    from launcher.tracking import MLflowTracker, _current

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowTracker(uri, "exp", "run", None, None, {})
    first.log_params({"eval.every_steps": 4})
    first.finish()
    for change in ("4 -> 5", "5 -> 7", "5 -> 7"):
        again = MLflowTracker(uri, "exp", "run", first.run_id, None, {})
        again.log_params({"eval.every_steps": 4, "resumed_at_6.eval.every_steps": change}, resumed_at=6)
        again.finish()
    params = MlflowClient(tracking_uri=uri).get_run(first.run_id).data.params
    assert {k: v for k, v in params.items() if "every_steps" in k} == {
        "eval.every_steps": "4", "resumed_at_6.eval.every_steps": "4 -> 5", "resumed_at_6_2.eval.every_steps": "5 -> 7"}
    assert _current(params, "eval.every_steps") == "7"


def test_the_end_table_names_the_exported_step_and_keeps_its_columns_apart():
    """The column of the exported evaluation is named by its step (it said "final", which read
    as the last step's), and a long step number still leaves a space between the columns."""
    from launcher.report import final_table

    for step in (50, 123456):
        head, rule, *rows = final_table({"macro_f1": 0.25, "loss": 0.7}, {"macro_f1": 0.5, "loss": 0.6, "n": 4}, step).splitlines()
        assert head.split() == ["metric", "step", "0", "step", str(step), "change"]
        assert [r.split() for r in rows] == [["macro_f1", "0.2500", "0.5000", "+0.2500"], ["loss", "0.7000", "0.6000", "-0.1000"]]
        assert len(rule) == len(head)
    # A tuned cut: the exported figures were scored on the rows it was tuned on, so their change
    # from step 0 (at 0.5) is not given; the @0.5 row carries it under one rule.
    head, rule, *rows, note = final_table({"macro_f1": 0.3, "loss": 0.7, "f1/unfair": 0.1},
                                          {"macro_f1": 0.8, "macro_f1@0.5": 0.75, "loss": 0.5, "f1/unfair": 0.7}, 30).splitlines()
    assert [r.split() for r in rows] == [["macro_f1", "0.3000", "0.8000"], ["loss", "0.7000", "0.5000", "-0.2000"],
                                         ["macro_f1@0.5", "0.3000", "0.7500", "+0.4500"], ["f1/unfair", "0.1000", "0.7000"]]
    assert note.startswith("(f1/unfair, macro_f1: under the cut tuned on these validation rows")
    # A class's @0.5 row is the 0.5 rule's, as at step 0: its change is given (it was left blank,
    # and the note listed it among the tuned ones).
    *_, f1_rule, note = final_table({"macro_f1": 0.3, "f1/unfair": 0.1}, {"macro_f1": 0.8, "macro_f1@0.5": 0.75,
                                    "f1/unfair": 0.7, "f1/unfair@0.5": 0.6}, 30).splitlines()
    assert f1_rule.split() == ["f1/unfair@0.5", "0.1000", "0.6000", "+0.5000"] and "@0.5," not in note, note


def test_a_run_killed_while_mlflow_builds_its_store_leaves_no_half_built_one(tmp_path):
    """MLflow creates the tables of a new SQLite store one migration after another; a run
    killed in between left a half-built mlflow.db, and every later run in that output
    directory stopped at `table ... already exists`. Killed now inside the build (the store
    made beside its place, not yet linked there), it leaves no mlflow.db; the same command
    then builds it for the next run, and removes the dead build's temporary. A store half-built by an
    older launcher is named in one line that says to remove it."""
    import os
    import subprocess
    import sys

    import sqlite3

    from mlflow.tracking import MlflowClient

    from conftest import FAST, OFFLINE_ENV, check, launcher
    from test_faults import _kill_tree_when_stopped

    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *FAST, "train.max_steps=2",
            "eval.every_steps=0"]
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **OFFLINE_ENV, "LAUNCHER_FAILPOINT": "mlflow-store"})
    _kill_tree_when_stopped(proc)
    assert not (tmp_path / "mlflow.db").exists()
    (left,) = tmp_path.glob(".mlflow.db.*.building")  # the dead build's (host, pid)
    check(launcher(*args[:5], "again", *args[6:]))  # (another run: "r" would start again in place)
    assert not left.exists() and (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("launcher-demo").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "again"

    # As an older launcher's kill mid-migration left one (seen: 19 or 25 tables, an older
    # version stamp): the trace tables made, the stamp from before them, one later table missing.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{legacy / 'mlflow.db'}").search_experiments()
    with sqlite3.connect(legacy / "mlflow.db") as db:
        db.execute("DROP TABLE trace_tags")
        db.execute("UPDATE alembic_version SET version_num = 'acf3f17fdcc7'")  # the revision before the trace tables
    db.close()
    proc = launcher(*args[:3], str(legacy), *args[4:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].endswith(f"already exists; {legacy / 'mlflow.db'} was left half-built by a run killed while MLflow "
                              "created its tables (it holds no run): remove it, unless another run is creating it at this moment")
    (legacy / "mlflow.db").unlink()
    check(launcher(*args[:3], str(legacy), *args[4:]))


def test_a_store_is_built_where_hard_links_fail_and_a_killed_builds_journal_goes(tmp_path, monkeypatch):
    """On a file system without hard links (vfat, some CIFS and FUSE mounts) the built store
    is renamed into place; a dead build's temporaries of this host, its SQLite journal among
    them, are removed by the next build."""
    import os
    import socket
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from launcher import tracking

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    left = [tmp_path / f".mlflow.db.{socket.gethostname()}.{gone}.building{end}" for end in ("", "-journal")]
    for path in left:
        path.write_bytes(b"half")

    def no_links(*_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    tracking.build_sqlite_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]
    assert [e.name for e in MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()] == ["Default"]


def test_the_wandb_hint_fits_the_mode_and_the_failure(tmp_path):
    """What a W&B that cannot start says to do: online, go offline or log in; offline, never
    "set WANDB_MODE=offline" (it is): the directory it could not write for a file error, else
    how to run without it; a missing wandb, how to install it."""
    from launcher.tracking import _wandb_hint

    online = _wandb_hint(ValueError("no api key"), "online", tmp_path)
    assert "WANDB_MODE=offline" in online and "log in" in online
    for mode in ("offline", "dryrun"):
        assert "WANDB_MODE" not in _wandb_hint(ValueError("run ID x is in use"), mode, tmp_path)
        assert str(tmp_path) in _wandb_hint(PermissionError("denied"), mode, tmp_path)
    assert "pip install wandb" in _wandb_hint(ImportError("wandb"), "online", tmp_path)
