"""MLflow + W&B + a local metrics.jsonl behind one facade; real only on global rank 0.

`start_tracking` is the single place that decides who logs: rank 0 gets the real
trackers, every other rank gets `Tracker()`, whose methods do nothing, so the
loop calls the tracker unconditionally and holds no rank checks.

Train metrics are buffered and sent in batches (`log_batch`): one synchronous
MLflow call costs tens of ms, longer than a tiny training step (NOTES.md). After the
run starts, every MLflow call goes through one sender thread in order, so training
never waits on the server: when it stops answering, the run prints one warning, keeps
every call queued (metrics.jsonl has them all the while) and retries with backoff; when
the server returns, the queue drains in order and one line says so. The end of a run
waits up to `tracking.outage_wait_s` for a server that is down.
"""

from __future__ import annotations

import collections
import json
import math
import re
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

from launcher import __version__
from launcher.config import TrackingConfig, redact_text, redact_uri
from launcher.errors import ConfigError, UserError
from launcher.files import write_atomically

if TYPE_CHECKING:
    from launcher.config import RunConfig


LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # the run tag by which MLflow's UI knows a table artifact
DERIVED = "derived."  # params the run computes (steps, accumulation, counts), not the config


def _current(params: dict, key: str) -> str:
    """A param's value as the run stands: its latest resumed_at_<step>.<key> change's new value,
    else the first attempt's (a requeue after an extension is no change of its own)."""
    changes = [((int(m.group(1)), int(m.group(2) or 1)), v) for k, v in params.items()
               if (m := re.fullmatch(rf"resumed_at_(\d+)(?:_(\d+))?\.{re.escape(key)}", k))]
    return max(changes)[1].rsplit(" -> ", 1)[-1] if changes else params[key]


def _second_change(key: str, value: str, existing: dict) -> str | None:
    """Where a change goes that another attempt made at the same step (killed before its next
    checkpoint, resumed again from the same one with another value): resumed_at_<step>_<n>.<key>,
    as MLflow keeps a param's first value. None when the change is logged already."""
    step, rest = key.split(".", 1)
    for n in range(1, 1000):
        name = key if n == 1 else f"{step}_{n}.{rest}"
        if existing.get(name) == value:
            return None
        if name not in existing:
            return name
    return None


WANDB_STEP = "train/global_step"  # W&B's x-axis: the optimizer step (see WandbTracker)


@dataclass(frozen=True)
class Setup:
    """What the trackers read of a run, resolved once: its tracking section (a copy), the
    store's URI (the default SQLite store lives beside the runs), where that default store
    keeps artifacts (None: the server decides), and the run's name. The trackers get this,
    not the whole run config."""

    section: TrackingConfig
    uri: str
    run_name: str
    artifact_root: str | None

    @classmethod
    def of(cls, cfg: "RunConfig") -> "Setup":
        # default SQLite store: artifacts beside it, not in ./mlruns of the working directory
        root = None if cfg.tracking.uri else (Path(cfg.output_dir) / "mlartifacts").resolve().as_uri()
        return cls(replace(cfg.tracking), cfg.tracking_uri, str(cfg.run_name), root)  # (as cfg.run_dir names it)


class Tracker:
    """No-op tracker (non-zero ranks, or everything disabled)."""

    name = "none"
    run_id: str | None = None

    def log_params(self, params: dict, resumed_at: int | None = None) -> None:
        """The run's params; resumed_at: the step a resumed run goes on from (derived values
        that changed since the first attempt are recorded at it)."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_outcome(self, values: dict) -> None:
        """What the run ended with (the exported step and its score): unlike params, replaced
        when a resumed or extended run ends again."""

    def log_table(self, rows: list[dict], name: str, step: int) -> None:
        """The run's table `name` as it stands at `step`: every row so far (same keys each, a
        `step` among them), rows of an interrupted attempt's later steps already dropped."""

    def log_inputs(self, datasets: list[dict]) -> None:
        """The data the run read: dicts of name, digest, source, context (training/validation), rows."""

    def log_model(self, model_dir: Path, step: int, register_as: str | None = None) -> None:
        """The exported model directory, as the run's model."""

    def flush(self, wait: bool = False) -> None:
        """Send what is buffered; wait: until the tracker has it, unless it is down."""

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def abandon(self) -> None:
        """Undo this tracker's start: a tracker started after it failed to start, so the run
        ends before its first step (best effort; nothing is waited for)."""
        self.finish("FAILED")

    def ids(self) -> dict:
        return {}

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, tb) -> None:
        """An exception ends the run: its tracker run ends FAILED (a halt or the end of the
        schedule finish it themselves, KILLED or FINISHED)."""
        if error is not None:
            self.finish(status="FAILED")


# Server answers that retrying cannot fix: the call is dropped with a warning.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
              "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"}


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts: letters, digits, _ - . / : and spaces, no empty, "." or
    ".." part, at most 250 characters. Per-class names come from the data (label names, an
    SFT run's closed answer set: "eval/f1/yes, with notice"), and MLflow refuses a whole batch
    for one bad name: every value merged into it was lost, at each evaluation. A name changed
    ends in a short hash of the original, so two ("yes, no" and "yes; no") stay two."""
    import hashlib
    import re

    parts = [re.sub(r"[^\w.\- :]", "_", part) for part in name.split("/")]
    key = "/".join(p if p.strip(".") else p.replace(".", "_") or "_" for p in parts)
    if key == name and len(key) <= 250:
        return key
    return key[:242].rstrip("/") + "-" + hashlib.sha1(name.encode()).hexdigest()[:7]


# Server answers that say "later": retried for as long as the run goes on, as a lost connection is.
_TRANSIENT = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}
# An error neither list names (an artifact store's missing credentials; ENDPOINT_NOT_FOUND, a
# server older than the call, MLflow 2.x and logged models, or a proxy's 404 while the server
# restarts): the call is dropped after this many tries.
UNKNOWN_TRIES = 5
# Metric values a tracker's queue holds at most while its server is down (an MLflow Metric
# takes about 250 bytes: 0.5 GB; at 20 values a second, a day of outage).
MAX_QUEUED_METRICS = 2_000_000
# How often a run may start MLflow's system-metrics monitor again after it ended on an error.
REVIVE_SYSTEM_METRICS_S = 60.0


# Measured, not computed: a resumed attempt's differ from a killed one's at the same step.
TIMINGS = ("train/samples_per_s", "train/tokens_per_s", "train/step_time_s", "train/mfu", "train/gpu_mem_peak_gb")


def _logged(have: dict, metric) -> bool:
    """Whether the run holds this value at this step already (a timing: any value there). Within
    1e-4: a resume on a GPU may differ in the last digits (atomics, bf16), a changed history more."""
    if metric.step not in have:
        return False
    return metric.key in TIMINGS or math.isclose(have[metric.step], metric.value, rel_tol=1e-4, abs_tol=1e-12)


def _permanent(error: Exception) -> bool:
    return getattr(error, "error_code", None) in _PERMANENT


def _transient(error: Exception) -> bool:
    """A failure retrying fixes: no connection, a timeout, a 5xx or 429 (MLflow's client names
    them; an artifact upload's requests.HTTPError carries the status)."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    return isinstance(error, OSError) or getattr(error, "error_code", None) in _TRANSIENT


def _has_url(error: Exception) -> bool:
    return "://" in str(error)


def _reason(error: Exception) -> str:
    """A short cause for a failed call, without the URL (it may carry credentials)."""
    import re

    text = str(error)
    for pattern in (r"\[Errno -?\d+\] [^'\")]+", r"[Rr]ead timed out", r"error code \d+", r"[A-Z_]{6,}"):
        if m := re.search(pattern, text):
            return m.group(0).strip()
    return type(error).__name__


WHILE_UP_CAP = 6  # drain(while_down=True): the whole wait's bound, in timeouts (30 min for outage_wait_s 300)


class RedactingFilter:
    """A logging filter: the record's message with the URI's secrets replaced (redact_text)."""

    def __init__(self, uri: str):
        self.uri = uri

    def filter(self, record) -> bool:
        message = record.getMessage()
        if (redacted := redact_text(message, self.uri)) != message:
            record.msg, record.args = redacted, ()
        return True


class Sender:
    """Runs tracker calls in order on one thread. A call that fails for a reason retrying
    can fix (no connection, a 5xx) stays at the head of the queue and is retried with
    backoff (1 s doubling to `max_backoff_s`); the first failure prints one warning and
    the recovery one line. Consecutive metric batches are merged into one call."""

    def __init__(self, where: str, send_metrics, max_backoff_s: float = 30.0, say=None, max_queued: int = MAX_QUEUED_METRICS):
        self.where, self.send_metrics, self.max_backoff_s = where, send_metrics, max_backoff_s
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.queue: collections.deque = collections.deque()  # ("metrics", [Metric]) | ("call", what, fn)
        # Metric values queued, and the most that may be: a days-long outage grew the queue
        # without end. Past it the oldest queued values go (metrics.jsonl keeps them).
        self.queued, self.max_queued, self.shed = 0, max_queued, 0
        self.in_flight = 0  # queue items the thread is sending: never dropped under it
        self.cond = threading.Condition()
        self.down_since: float | None = None
        self.outages, self.busy, self.closed = 0, False, False
        self.thread = threading.Thread(target=self._run, name="tracker-sender", daemon=True)
        self.thread.start()

    def put_metrics(self, metrics: list) -> None:
        if metrics:
            with self.cond:
                self.queue.append(("metrics", metrics))
                self.queued += len(metrics)
                self._shed()
                self.cond.notify()

    def _shed(self) -> None:
        """Over max_queued values (under the lock): drop the oldest metric batches not in flight."""
        i = self.in_flight
        while self.queued > self.max_queued and i < len(self.queue) - 1:
            if self.queue[i][0] != "metrics":
                i += 1
                continue
            n = len(self.queue[i][1])
            del self.queue[i]
            self.queued -= n
            if not self.shed:
                self.say(f"warning: tracking: over {self.max_queued} metric values queued for {self.where}: the "
                         "oldest are dropped from the queue (the run's metrics.jsonl has them all; a resume sends "
                         "what the tracker's run lacks)")
            self.shed += n

    def put_call(self, what: str, fn) -> None:
        with self.cond:
            self.queue.append(("call", what, fn))
            self.cond.notify()

    def pending_metrics(self) -> int:
        with self.cond:
            return self.queued

    def drain(self, timeout_s: float, while_down: bool = False) -> bool:
        """Wait until everything queued so far is sent (True) or timeout_s passes (False).
        while_down: only time the server does not answer counts, so calls that keep going (a
        large model upload) are waited for, up to WHILE_UP_CAP times timeout_s in all (a call
        that hangs without failing, on a hung file system, must not hold the job)."""
        start = time.monotonic()
        with self.cond:
            while self.queue or self.busy:
                now = time.monotonic()
                if while_down and now - start >= WHILE_UP_CAP * timeout_s:
                    return False
                since = start if not while_down else (max(start, self.down_since) if self.down_since is not None else None)
                if since is not None and now - since >= timeout_s:
                    return False
                self.cond.wait(0.5 if since is None else min(timeout_s - (now - since), 0.5))
        return True

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _next(self):
        """The head of the queue as one call: merged metric batches (up to 1000 values) or a call."""
        with self.cond:
            while not self.queue and not self.closed:
                self.cond.wait()
            if self.closed:
                return None, 0
            self.busy = True
            if self.queue[0][0] == "call":
                self.in_flight = 1
                return self.queue[0], 1
            merged, n = [], 0
            for item in self.queue:
                if item[0] != "metrics" or (merged and len(merged) + len(item[1]) > 1000):
                    break
                merged.extend(item[1])
                n += 1
            self.in_flight = n
            return ("metrics", merged), n

    def _run(self) -> None:
        backoff, tries = 1.0, 0
        while True:
            item, n = self._next()
            if item is None:
                return
            queued = self.pending_metrics() if self.down_since is not None else 0
            try:
                if item[0] == "metrics":
                    self.send_metrics(item[1])
                else:
                    item[2]()
                failed = None
            except Exception as e:  # noqa: BLE001 - any failure of the tracker must not stop training
                failed = e
            # An error neither permanent nor transient (an artifact store's missing credentials,
            # a 413 from a proxy) was retried forever, holding every call queued behind it: an
            # artifact logged at each evaluation stopped the run's metrics for good.
            tries = tries + 1 if failed is not None and not _transient(failed) else 0
            drop = failed is not None and (_permanent(failed) or tries >= UNKNOWN_TRIES)
            with self.cond:
                if failed is None or drop:
                    for _ in range(n):
                        self.queue.popleft()
                    self.queued -= len(item[1]) if item[0] == "metrics" else 0  # the n batches, merged
                self.busy, self.in_flight = False, 0
                self.cond.notify_all()
            # Only a transient failure is an outage (announced, waited for before a checkpoint);
            # any other answer means the server is there, refusing this one call.
            answered = failed is None or not _transient(failed)
            if answered and self.down_since is not None:
                self.say(f"tracking: {self.where} answers again after {time.monotonic() - self.down_since:.0f} s; "
                         f"sending the {queued} metric values queued meanwhile, in order"
                         + (f" ({self.shed} older ones were dropped from the queue)" if self.shed else ""))
                self.down_since, backoff = None, 1.0
                with self.cond:
                    self.shed = 0  # the next outage's queue warns again
            if drop and failed is not None:
                tries, backoff = 0, 1.0
                what = "metrics" if item[0] == "metrics" else item[1]
                after = "" if _permanent(failed) else f" after {UNKNOWN_TRIES} tries"
                self.say(f"warning: tracking: {self.where} refused {what}{after} ({_reason(failed)}): "
                         f"{str(failed).splitlines()[0][:200] if not _has_url(failed) else 'see the server log'}")
            elif failed is not None:
                if not answered and self.down_since is None:
                    self.down_since, self.outages = time.monotonic(), self.outages + 1
                    self.say(f"warning: tracking: {self.where} is not answering ({_reason(failed)}); "
                             "training goes on, metrics are kept in metrics.jsonl and sent when it answers again")
                with self.cond:
                    if self.cond.wait_for(lambda: self.closed, timeout=backoff):
                        return  # finish() gave up waiting: what is left stays in metrics.jsonl
                backoff = min(backoff * 2, self.max_backoff_s)


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None, artifact_root: str | None, tags: dict,
                 outage_wait_s: float = 300.0, system_metrics_every_s: float = 0.0):
        from mlflow.tracking import MlflowClient

        if redact_uri(uri) != uri:  # mlflow prints "View run ... at <uri>", password included
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        build_sqlite_store(uri)  # (the warm-up's, unless it was not run or failed)
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.run_name = run_name
        # Finding or creating the run and counting this attempt wait on the server (the start
        # checked it answers): an attempt killed a moment later is still counted. From then on
        # every call goes through the sender (see the module docstring).
        created, self.resumed, self.replaced = self._run(run_id, tags, experiment, artifact_root)
        self.run_id: str = created
        try:
            if self.resumed:
                self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "launcher.attempts", str(int(self._tag("launcher.attempts") or 0) + 1))
        except Exception:
            self._undo()  # the start fails (tracking._starting says why): leave no run behind
            raise
        self._buffer: list = []
        self.outage_wait_s = outage_wait_s
        # The sender retries on its own schedule; the client's own retries (7, backoff factor 2:
        # minutes per call) would only delay the warning and the recovery. Read per request.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        # No progress bar for each artifact sent (a table at every evaluation).
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self._have: dict = {}  # on resume: the steps the run has per metric (see backfill)
        self.sender = Sender(f"MLflow at {redact_uri(uri)}", self._send_metrics)
        self._system_lock, self._system_started, self._reviving = threading.Lock(), time.monotonic(), False
        self.system = self._system_metrics(system_metrics_every_s) if system_metrics_every_s > 0 else None

    def _experiment(self, name: str, artifact_root: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_root)
        except Exception as e:
            # Jobs of an array starting together: another created it between the two calls.
            if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS" or not (exp := self.client.get_experiment_by_name(name)):
                raise
            return exp.experiment_id

    def _run(self, run_id: str | None, tags: dict, experiment: str, artifact_root: str | None) -> tuple[str, bool, str | None]:
        """(the run's id, resumed?, the recorded id it replaces), self.experiment_id set. A
        recorded run the store lacks (tracking.uri changed since, or the run was deleted)
        failed every attempt's start: a new run takes the history over instead. A recorded run
        stays in its experiment whatever tracking.experiment says now (MLflow moves no run: the
        run stayed, an empty experiment of the new name was made, and the export's logged model
        went there, apart from its run)."""
        held = self._experiment_of(run_id) if run_id else None
        replaced = run_id if run_id and held is None else None
        self.experiment_id = held or self._experiment(experiment, artifact_root)
        if held is not None and (name := self.client.get_experiment(held).name) != experiment:
            print(f"tracking: MLflow run {run_id} stays in experiment {name!r}, where its first attempt started it "
                  f"(tracking.experiment {experiment!r} is where a new run would go)", file=sys.stderr, flush=True)
        if replaced:
            run_id, tags = None, {**tags, "launcher.previous_run_id": replaced}
        created = run_id or self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags).info.run_id
        if not created:
            raise RuntimeError("the tracking server created a run without an id")
        if replaced:
            print(f"tracking: MLflow run {replaced} is not in {redact_uri(self.uri)} (tracking.uri changed, or the run "
                  f"was deleted): this run logs to a new MLflow run {created}, metrics.jsonl's earlier values included",
                  file=sys.stderr, flush=True)
        return created, bool(run_id), replaced

    def _system_metrics(self, every_s: float):
        """MLflow's own monitor (psutil; GPUs through pynvml when installed): the run's "System
        metrics" tab. It stops by itself once the run is no longer RUNNING."""
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "Started monitoring" lines
        # Its warning when the server does not answer quotes MLflow's error, the URL with its password in it.
        logging.getLogger("mlflow.system_metrics.system_metrics_monitor").addFilter(RedactingFilter(self.uri))
        try:
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=every_s, resume_logging=self.resumed,
                                           tracking_uri=self.uri)
            monitor.start()
            return monitor
        except Exception as e:  # noqa: BLE001 - a monitor is worth a warning, never the run
            self.sender.say(f"warning: MLflow system metrics off: {redact_text(str(e), self.uri)[:200]}")
            return None

    def _mind_system_metrics(self) -> None:
        """MLflow's monitor ends its thread for good at its first failed call (mlflow 3.x,
        SystemMetricsMonitor.monitor returns on any error): one outage stopped a long run's
        system metrics for the rest of it. While the server answers, a monitor found ended is
        started again (at most once per REVIVE_SYSTEM_METRICS_S) and goes on from the steps the
        run has."""
        monitor = self.system
        if monitor is None or monitor._process is None or monitor._process.is_alive() or self.sender.down_since is not None:
            return  # (_process: the monitor's thread, None once finished)
        if self._reviving or time.monotonic() - self._system_started < REVIVE_SYSTEM_METRICS_S:
            return  # (one start queued at a time: a queue behind an outage may take minutes to reach it)
        self._system_started, self._reviving = time.monotonic(), True
        self.sender.put_call("system metrics", lambda: self._revive_system_metrics(monitor))

    def _revive_system_metrics(self, ended) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with self._system_lock:  # the run's end stops it under this lock: no monitor after the end
            self._reviving = False
            if ended is None or self.system is not ended:  # ended meanwhile, or already started again
                return
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=ended.sampling_interval, resume_logging=True,
                                           tracking_uri=self.uri)
            monitor.start()
            self.system = monitor

    def _experiment_of(self, run_id: str) -> str | None:
        """The experiment id of a recorded run; None where the store lacks it (or it is deleted)."""
        try:
            info = self.client.get_run(run_id).info
        except Exception as e:
            if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return info.experiment_id if info.lifecycle_stage != "deleted" else None

    def _tag(self, key: str):
        return self.client.get_run(self.run_id).data.tags.get(key)

    def log_params(self, params: dict, resumed_at: int | None = None) -> None:
        from mlflow.entities import Param

        def send():
            existing = self.client.get_run(self.run_id).data.params if self.resumed else {}
            # MLflow forbids changing a logged param; a resumed run keeps the first values. The
            # config's changes come listed (config_changes.params); a derived value they moved
            # (total steps after an extension, accumulation after a batch change) is added at
            # the step it changed, or the run would show the first attempt's as current.
            moved = {f"resumed_at_{resumed_at}.{k}": f"{_current(existing, k)} -> {str(v)[:6000]}"
                     for k, v in params.items() if resumed_at is not None and k.startswith(DERIVED)
                     and k in existing and _current(existing, k) != str(v)[:6000]
                     and f"resumed_at_{resumed_at}.{k.removeprefix(DERIVED)}" not in params}
            items = []
            for k, v in (params | moved).items():
                # (another attempt's change at this same step keeps its name: this one gets the next)
                again = resumed_at is not None and k.startswith(f"resumed_at_{resumed_at}.")
                name = _second_change(k, str(v)[:6000], existing) if again else None if k in existing else k
                if name is not None:
                    items.append(Param(name, str(v)[:6000]))
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

        self.sender.put_call("params", send)

    def log_outcome(self, values: dict) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, str(v)) for k, v in values.items()]  # tags, as params cannot change
        self.sender.put_call("outcome", lambda: self.client.log_batch(self.run_id, tags=tags))

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items())

    def backfill(self, records: list[dict]) -> None:
        """On resume, make the run's history one value per (metric, step): send what
        metrics.jsonl kept (steps up to the checkpoint) that the run lacks (still queued when
        an earlier attempt was killed), and from then on skip a step's value the run already
        has (logged by a killed attempt past its last checkpoint: the resumed run recomputes
        the same). A different value is sent: the resume changed what it computes (a new lr,
        or a history gone back to an earlier checkpoint); MLflow keeps both, the newer as the
        latest. Timings differ at every attempt: a step that has them is not sent again."""
        from mlflow.entities import Metric

        def send():
            now = int(time.time() * 1000)
            keys = {mlflow_key(k) for r in records for k in r if k != "step"} | set(self.client.get_run(self.run_id).data.metrics)
            have: dict = {}
            for k in keys:  # each step's latest value
                for m in sorted(self.client.get_metric_history(self.run_id, k), key=lambda m: m.timestamp):
                    have.setdefault(k, {})[m.step] = m.value
            missing = [Metric(mlflow_key(k), float(v), now, r["step"]) for r in records for k, v in r.items()
                       if k != "step" and r["step"] not in have.get(mlflow_key(k), {})]
            for i in range(0, len(missing), 1000):
                self.client.log_batch(self.run_id, metrics=missing[i : i + 1000])
            for m in missing:
                have.setdefault(m.key, {})[m.step] = m.value
            self._have = have
            if missing:
                self.sender.say(f"tracking: {len(missing)} metric values from metrics.jsonl that the MLflow run "
                                "lacked were sent")

        self.sender.put_call("metrics kept in metrics.jsonl", send)

    def _send_metrics(self, metrics: list) -> None:
        if self._have:
            metrics = [m for m in metrics if not _logged(self._have.get(m.key, {}), m)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def flush(self, wait: bool = False) -> None:
        """Hand the buffered metrics to the sender. wait (before a checkpoint): until the server
        has them, so a run killed later resumes with its MLflow history whole; not while the
        server is down (training never waits on it then)."""
        self.sender.put_metrics(self._buffer)
        self._buffer = []
        self._mind_system_metrics()
        if wait and self.sender.down_since is None:
            self.sender.drain(30.0)

    def log_artifact(self, path, artifact_path=None) -> None:
        self.sender.put_call(f"artifact {Path(path).name}", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_inputs(self, datasets: list[dict]) -> None:
        """Run inputs (the run's "Datasets" column). A resumed run logs them again: MLflow keeps
        one entry per (dataset, context)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entries = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                        source=json.dumps({"uri": d["source"]}),
                                        profile=json.dumps({"num_rows": d["rows"]})),
                                [InputTag("mlflow.data.context", d["context"])]) for d in datasets]
        self.sender.put_call("datasets", lambda: self.client.log_inputs(self.run_id, datasets=entries))

    def log_model(self, model_dir, step, register_as=None) -> None:
        """The export as an MLflow logged model of this run (the run's "Logged models"), its
        files as the model's artifacts; registered as a new version of `register_as` when set."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        made: list = []  # the sender retries a call from its start: create the model once

        def send():
            if not made:
                made.append(self.client.create_logged_model(self.experiment_id, name=self.run_name,
                                                            source_run_id=self.run_id, model_type="transformers",
                                                            params={"step": str(step)}))
            model = made[0]
            self.client.log_model_artifacts(model.model_id, str(model_dir))
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
            if register_as:
                try:
                    self.client.create_registered_model(register_as)
                except Exception as e:  # noqa: BLE001 - it exists: a new version of it
                    if "ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) + str(e):
                        raise
                version = self.client.create_model_version(register_as, f"models:/{model.model_id}",
                                                           run_id=self.run_id, model_id=model.model_id)
                self.sender.say(f"MLflow: registered model {register_as} version {version.version}")

        self.sender.put_call("the model", send)

    def log_table(self, rows, name, step) -> None:
        # The whole table replaces the artifact: MlflowClient.log_table appends, so a resumed
        # run sent again the rows of steps its interrupted attempt had sent. Written as
        # log_table writes it (pandas, orient=split) and tagged alike, so the UI shows a table.
        import tempfile

        import pandas as pd

        frame = pd.DataFrame(rows)

        def send():
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.json"
                frame.to_json(path, orient="split", index=False)
                self.client.log_artifact(self.run_id, str(path))
            logged = json.loads(self.client.get_run(self.run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
            if (entry := {"path": f"{name}.json", "type": "table"}) not in logged:
                self.client.set_tag(self.run_id, LOGGED_ARTIFACTS, json.dumps([*logged, entry]))

        self.sender.put_call(f"table {name}", send)

    def finish(self, status: str = "FINISHED") -> None:
        """Send everything queued and mark the run ended. A server that is down is waited
        for up to outage_wait_s (15 s at most when the run failed or was stopped: its
        checkpoint is saved and the job may have little time left); then the run stays
        RUNNING in MLflow and the line printed says what was not sent."""
        self.flush()
        self._stop_system_metrics()
        self.sender.put_call("the run's end", lambda: self.client.set_terminated(self.run_id, status=status))
        # A finished run waits for calls that go on succeeding (a model upload may take longer
        # than outage_wait_s: cut off, it stayed half sent and the run RUNNING); a stopped one
        # has little time left and waits at most 15 s in all.
        finished = status == "FINISHED"
        wait = self.outage_wait_s if finished else min(self.outage_wait_s, 15.0)
        if not self.sender.drain(0.0) and self.sender.down_since is not None:
            self.sender.say(f"tracking: waiting up to {wait:.0f} s for {self.sender.where} (tracking.outage_wait_s)")
        if not self.sender.drain(wait, while_down=finished):
            # Either the server stayed down for `wait`, or it answered while a call went on
            # past the whole cap (a large upload, a hung file system).
            why = (f"did not answer within {wait:.0f} s" if self.sender.down_since is not None or not finished
                   else f"was still taking calls after {WHILE_UP_CAP * wait:.0f} s")
            self.sender.say(f"warning: tracking: {self.sender.where} {why}: "
                            f"{self.sender.pending_metrics()} metric values and the run's end were not sent; "
                            "all metrics are in the run's metrics.jsonl")
        self.sender.close()

    def _stop_system_metrics(self) -> None:
        with self._system_lock:
            monitor, self.system = self.system, None
        if monitor is None:
            return
        if self.sender.down_since is None:
            monitor.finish()  # joins its thread and sends its last samples before the run ends
        else:  # the server is down: its last samples are not worth a blocked end (20 s per call)
            monitor._shutdown_event.set()

    def abandon(self) -> None:
        self._stop_system_metrics()
        self.sender.close()
        self._undo()

    def _undo(self) -> None:
        """The run this attempt created is deleted (its run directory goes too); a resumed
        run, which this attempt set RUNNING, ends FAILED."""
        try:
            if self.resumed:
                self.client.set_terminated(self.run_id, status="FAILED")
            else:
                self.client.delete_run(self.run_id)
        except Exception:  # noqa: BLE001 - the start is failing already; its one line says why
            pass

    def ids(self) -> dict:
        return {"mlflow": self.run_id}


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, project: str, run_name: str, run_id: str | None, mode: str, directory: Path, tags: dict,
                 entity: str | None = None):
        import wandb

        # W&B's own variables hold where launcher has no say of its own: WANDB_DIR (else the run
        # directory), WANDB_NAME, WANDB_RUN_ID (a new run's id), WANDB_TAGS (added to launcher's),
        # and the ones wandb.init reads itself (WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_NOTES, ...).
        directory = Path(os.environ.get("WANDB_DIR") or directory)
        directory.mkdir(parents=True, exist_ok=True)
        # wandb.init joins the W&B service named by WANDB_SERVICE, which a process that used W&B
        # sets for its children (a notebook, a script that runs launcher). The run then lives in
        # that process's service: a killed attempt's run stays open there, and the resumed one
        # stopped with "run ID ... is in use". launcher's run is its own process's (its own
        # service, ended with it). (A second run in one process keeps its first connection.)
        os.environ.pop("WANDB_SERVICE", None)
        own = [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]
        self.run = wandb.init(
            project=project,
            entity=entity,  # (None: W&B's own choice, WANDB_ENTITY else the login's default)
            name=os.environ.get("WANDB_NAME") or run_name,
            # 64 random bits: with resume="allow" a new run whose id a project already holds
            # continues that run (32 bits collided once in ~77,000 runs of a project, even odds).
            id=run_id or os.environ.get("WANDB_RUN_ID") or secrets.token_hex(8),
            resume="allow",
            mode=cast(Any, mode),  # as wandb reads WANDB_MODE itself: its settings also take "dryrun" and "run"
            dir=str(directory),
            tags=(own + [f"{k}={v}" for k, v in tags.items()])[:20],
        )
        self.run_id, self.mode, self.directory, self.project = self.run.id, mode, directory, project
        self.entity = self.run.entity or None
        # Every metric on the run's own step axis, as transformers' W&B callback does: W&B drops
        # a log at an internal step below its last one, so a resumed run's steps between its
        # checkpoint and the kill kept the killed attempt's values. On this axis both attempts'
        # points are kept, as MLflow keeps them.
        self.run.define_metric(WANDB_STEP)
        self.run.define_metric("*", step_metric=WANDB_STEP, step_sync=True)

    def backfill(self, records: list[dict]) -> None:
        """On resume, send what metrics.jsonl kept (steps up to the checkpoint) that the W&B run
        lacks. wandb writes a run's records in 32 KiB blocks and about every 30 s, and has no
        flush: an attempt killed (SIGKILL, a node lost) lost what it had not written, often its
        whole history. What the run holds: offline, the points in the run files of its earlier
        attempts on this machine; online, up to the last step in the summary the server returned.
        Points past the checkpoint that the killed attempt did write are logged again by the
        resumed one: both are kept, on the run's own step axis."""
        if self.mode in ("offline", "dryrun"):
            have = wandb_points(self.directory, str(self.run_id))
            missing = [r for r in records if _point(r) not in have]
        else:
            last = self.run.summary.get(WANDB_STEP)
            missing = [r for r in records if not isinstance(last, (int, float)) or r["step"] > last]
        for r in missing:
            self.log_metrics({k: v for k, v in r.items() if k != "step"}, r["step"])
        if missing:
            print(f"tracking: {len(missing)} logged points from metrics.jsonl that the W&B run lacked were sent",
                  flush=True)

    def log_params(self, params: dict, resumed_at: int | None = None) -> None:
        self.run.config.update(params, allow_val_change=True)  # (W&B keeps the current values)

    def log_outcome(self, values: dict) -> None:
        self.run.summary.update(values)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log({**metrics, WANDB_STEP: step})

    def log_artifact(self, path, artifact_path=None) -> None:
        self.run.save(str(path), base_path=str(Path(path).parent), policy="now")

    def log_table(self, rows, name, step) -> None:
        import wandb

        rows = [r for r in rows if r["step"] == step]  # W&B keeps a table per logged step
        columns = list(rows[0])
        self.run.log({name: wandb.Table(columns=columns, data=[[r[k] for k in columns] for r in rows]), WANDB_STEP: step})

    def finish(self, status: str = "FINISHED") -> None:
        if status == "KILLED":  # stopped with a checkpoint to resume from: W&B's "preempted", not "failed"
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def ids(self) -> dict:
        return {"wandb": self.run_id, "wandb_project": self.project, "wandb_entity": self.entity}


def wandb_file_records(path: Path) -> list:
    """The records of a W&B run file (run-ID.wandb, online and offline alike): a 7-byte header
    (':W&B', magic, version), then LevelDB-log chunks (crc, length, type: full/first/middle/
    last) in 32 KiB blocks, each record a protobuf wandb_internal_pb2.Record; a record still
    being written ends it. Read here because wandb ships no reader for it."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, out, buf = path.read_bytes(), 7, [], b""
    if data[:4] != b":W&B":
        return []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end, or a record still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            out.append(pb.Record.FromString(buf))  # type: ignore[attr-defined]
            buf = b""
    return out


def wandb_rows(records: list) -> list[dict]:
    """The history rows of a W&B run file's records: {key: value as JSON text}."""
    return [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            for r in records if r.HasField("history")]


def _point(row: dict) -> tuple:
    """(step, metric names) of a metrics.jsonl record or a W&B history row."""
    step = row["step"] if "step" in row else row[WANDB_STEP]
    return int(float(step)), tuple(sorted(k for k in row if k not in ("step", WANDB_STEP) and not k.startswith("_")))


def wandb_points(directory: Path, run_id: str) -> set:
    """The (step, metric names) points that the files of run_id's attempts under directory
    hold. A file that does not read counts as empty: its points are sent again (twice at
    worst, never lost)."""
    have: set = set()
    for log in directory.glob(f"wandb/*-{run_id}/run-{run_id}.wandb"):
        try:
            have.update(_point(row) for row in wandb_rows(wandb_file_records(log)) if WANDB_STEP in row)
        except Exception:  # noqa: BLE001 - a file this reader does not know (see the docstring)
            continue
    return have


def _record(line: str) -> dict | None:
    """One metrics.jsonl line, or None when it is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's whole records, in order."""
    return [r for line in path.read_text(errors="replace").splitlines() if (r := _record(line)) is not None]


class JsonlTracker(Tracker):
    """metrics.jsonl in the run directory: the local record the plot and final table use.
    On resume, records past the resumed step (logged before an interruption) are dropped."""

    name = "jsonl"

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if path.is_file():
            # A killed attempt (kill -9, a node lost) may have left a line cut short, or zeros
            # where the file system had not written its last block: such a line is skipped
            # with a warning (resuming failed there with a traceback, at every retry), and the
            # file is rewritten whole so the next record starts on a line of its own.
            text = path.read_text(errors="replace")
            lines = [l for l in text.splitlines() if l.strip("\0")]
            records = [_record(l) for l in lines]
            kept = [l for l, r in zip(lines, records) if r is not None and (resume_step is None or r["step"] <= resume_step)]
            if bad := sum(r is None for r in records):
                print(f"warning: {path}: {bad} line(s) cut short by an earlier attempt skipped", file=sys.stderr, flush=True)
            if resume_step is not None or bad or not text.endswith("\n") and text:
                write_atomically(path, "".join(l + "\n" for l in kept))
        self._f = open(path, "a")

    def records(self) -> list[dict]:
        self._f.flush()
        return read_metrics(self.path)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def flush(self, wait: bool = False) -> None:
        self._f.flush()

    def finish(self, status: str = "FINISHED") -> None:
        self._f.close()


class MultiTracker(Tracker):
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self.run_id = next((t.run_id for t in trackers if t.name == "mlflow"), None)

    def log_params(self, params, resumed_at=None):
        for t in self.trackers:
            t.log_params(params, resumed_at)

    def log_outcome(self, values):
        for t in self.trackers:
            t.log_outcome(values)

    def log_metrics(self, metrics, step):
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path, artifact_path=None):
        for t in self.trackers:
            t.log_artifact(path, artifact_path)

    def log_table(self, rows, name, step):
        for t in self.trackers:
            t.log_table(rows, name, step)

    def log_inputs(self, datasets):
        for t in self.trackers:
            t.log_inputs(datasets)

    def log_model(self, model_dir, step, register_as=None):
        for t in self.trackers:
            t.log_model(model_dir, step, register_as)

    def flush(self, wait=False):
        for t in self.trackers:
            t.flush(wait)

    def finish(self, status="FINISHED"):
        for t in self.trackers:
            t.finish(status)

    def ids(self):
        out = {}
        for t in self.trackers:
            out.update(t.ids())
        return out


def git_commit() -> str | None:
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_tags(facts: dict) -> dict:
    tags = {
        "launcher.version": __version__,
        "world_size": str(facts["world_size"]),
        "num_nodes": str(facts["num_nodes"]),
        "distributed_type": facts["distributed_type"],
        "device": facts["device"],
        **({"zero_stage": str(facts["zero_stage"])} if facts.get("zero_stage") is not None else {}),
    }
    if commit := git_commit():
        tags["git_commit"] = commit
    if facts.get("slurm_job_id"):
        tags["slurm_job_id"] = facts["slurm_job_id"]
    return tags


def data_inputs(train_ds, val_ds) -> list[dict]:
    """The run's data as Tracker.log_inputs takes it (pipeline.TokenRows: source and digest)."""
    return [{"name": Path(d.source).name or d.source, "digest": d.digest, "source": d.source, "context": context,
             "rows": len(d)} for d, context in ((train_ds, "training"), (val_ds, "validation"))]


def check_reachable(setup: Setup, timeout_s: float = 5.0, answer_s: float = 60.0) -> None:
    """An MLflow server that does not answer stops the start within seconds, with one line
    and before the run directory exists; left to itself the mlflow client retries for
    minutes without a word. Any HTTP answer (even an error status) counts as reachable.

    Two deadlines: `timeout_s` to connect (a refused or unroutable address), `answer_s` for
    the answer of a server that accepted the connection. A team's server busy with many
    jobs can take seconds to answer; one 5 s deadline for both stopped such jobs at start
    (seen with 4 jobs through a 1 s-latency link)."""
    import socket
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    from launcher.errors import ConfigError

    uri = setup.uri
    if not setup.section.mlflow or not uri.startswith(("http://", "https://")):
        return
    parts = urlsplit(uri)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], path=parts.path.rstrip("/") + "/health"))

    def fail(reason) -> ConfigError:
        return ConfigError(f"tracking.uri: {redact_uri(uri)} does not answer ({reason}); start the server, "
                           "correct the URI, or set tracking.mlflow=false")

    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:  # a port that is not a number
        raise fail(e) from None
    if host and not (urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host)):  # no proxy between
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as e:
            raise fail(e.strerror or e) from None
    import ssl

    try:
        urllib.request.urlopen(bare, timeout=answer_s).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        # A certificate the server presented: it answers. This check trusts only the
        # system's CAs; the MLflow client also reads REQUESTS_CA_BUNDLE and
        # MLFLOW_TRACKING_SERVER_CERT_PATH, so a team server on a private CA is the client's call.
        if isinstance(e, ssl.SSLCertVerificationError) or isinstance(getattr(e, "reason", None), ssl.SSLCertVerificationError):
            return
        raise fail(getattr(e, "reason", None) or e) from None


def warm_up(setup: Setup, is_main: bool):
    """Start-up overlap: import mlflow and open its store (the default SQLite store creates
    its tables on first use, about 2 s) in a thread while the model loads. Nothing is
    created in the store but its schema; start_tracking joins the thread first, and its own
    errors are reported there, not here."""
    if not (is_main and setup.section.mlflow):
        return None
    import threading

    def touch():
        try:
            build_sqlite_store(setup.uri)
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=setup.uri).get_experiment_by_name(setup.section.experiment)
        except Exception:  # noqa: BLE001 - start_tracking meets the same problem and reports it
            pass

    thread = threading.Thread(target=touch, name="mlflow-warm-up", daemon=True)
    thread.start()
    _WARMING.append(thread)
    return thread


_WARMING: list = []


def build_sqlite_store(uri: str) -> None:
    """A new SQLite store (the default `OUTPUT_DIR/mlflow.db`) built whole before it takes its
    name. MLflow creates its tables on first use, one migration after another (about 2 s); a
    run killed in between left a half-built database, which MLflow never finishes: every
    later run in that output directory stopped at `table ... already exists`. So it is built
    beside its place and linked there once complete (a link never replaces a database another
    run made meanwhile; renamed where the file system has no hard links). A killed build leaves no database, and a temporary named by host and
    pid, which the next build removes once that process is gone."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return
    path = Path(uri[len("sqlite:///"):])
    if path.exists() or not path.parent.is_dir():
        return
    import socket

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from launcher import faults, owner

    host = socket.gethostname()
    prefix = f".{path.name}.{host}."
    for stale in path.parent.glob(prefix + "*.building*"):  # (with SQLite's -journal of a build killed mid-write)
        pid = stale.name[len(prefix):].split(".")[0]
        if pid.isdigit() and not owner.alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.parent / f"{prefix}{os.getpid()}.building"
    tmp.unlink(missing_ok=True)
    try:
        # The default experiment's artifact root: MLflow's own choice when a client opens the store.
        artifacts = os.environ.get("_MLFLOW_SERVER_ARTIFACT_ROOT", "./mlruns")
        SqlAlchemyStore("sqlite:///" + str(tmp), artifacts).engine.dispose()  # (nothing left open on it)
        faults.point("mlflow-store")
        try:
            os.link(tmp, path)
        except FileExistsError:  # another run's build came first: theirs is as good
            pass
        except OSError:  # a file system without hard links (vfat, some CIFS and FUSE mounts)
            if not path.exists():
                os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def left_running(setup: Setup, ids: dict) -> bool:
    """Whether the run's MLflow run is still RUNNING (an attempt killed before its end; the
    lease says none is alive). False when MLflow is off, has no such run, or does not answer."""
    if not (setup.section.mlflow and ids.get("mlflow")):
        return False
    try:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=setup.uri).get_run(ids["mlflow"]).info.status == "RUNNING"
    except Exception:  # noqa: BLE001 - no answer: nothing known to close
        return False


def settle() -> None:
    """Wait for a warm-up still touching the store (before removing what a failed start made)."""
    while _WARMING:
        _WARMING.pop().join()


def start_tracking(setup: Setup, is_main: bool, facts: dict, run_dir: Path, resume_ids: dict | None,
                   resume_step: int | None, warm=None) -> Tracker:
    """Real trackers on the logging rank, a no-op everywhere else."""
    if warm is not None:
        warm.join()
    if not is_main:
        return Tracker()
    resume_ids = resume_ids or {}
    tags = run_tags(facts)
    jsonl = JsonlTracker(run_dir / "metrics.jsonl", resume_step)
    trackers: list[Tracker] = [jsonl]
    t, uri = setup.section, setup.uri
    if t.mlflow:
        mlflow = _starting(f"MLflow at {redact_uri(uri)}", uri, trackers, lambda: MLflowTracker(
            uri, t.experiment, setup.run_name, resume_ids.get("mlflow"), setup.artifact_root, tags, t.outage_wait_s,
            t.system_metrics_every_s))
        if mlflow.resumed or mlflow.replaced or resume_step is not None:  # (the last: MLflow turned on at a resume)
            mlflow.backfill(jsonl.records())
        trackers.append(mlflow)
    # The config wins where it says something; otherwise W&B's own variables do, as in any
    # W&B program (a cluster's WANDB_MODE=offline used to be overridden by a default "online").
    mode = t.wandb_mode or os.environ.get("WANDB_MODE") or "online"
    if t.wandb and mode != "disabled":
        project = t.wandb_project or os.environ.get("WANDB_PROJECT") or "launcher"
        # A W&B run id is a project's: the same id under another project started a second run
        # there, the history split in two. A resumed run stays where it began, as in MLflow.
        held = resume_ids.get("wandb_project") if resume_ids.get("wandb") else None
        if held and held != project:
            print(f"tracking: W&B run {resume_ids['wandb']} stays in project {held!r}, where its first attempt started "
                  f"it (project {project!r} is where a new run would go)", file=sys.stderr, flush=True)
            project = held
        # So is its entity (a team, or a user): another WANDB_ENTITY on the resumed job's
        # machine started the same id under that entity, a second run again.
        entity = resume_ids.get("wandb_entity") if resume_ids.get("wandb") else None
        if entity and os.environ.get("WANDB_ENTITY", entity) != entity:
            print(f"tracking: W&B run {resume_ids['wandb']} stays with entity {entity!r}, where its first attempt started "
                  f"it (WANDB_ENTITY {os.environ['WANDB_ENTITY']!r} is where a new run would go)", file=sys.stderr, flush=True)
        wandb = _starting(f"W&B ({mode})", uri, trackers, lambda: WandbTracker(
            project, setup.run_name, resume_ids.get("wandb"), mode, run_dir / "wandb", tags, entity),
            hint=lambda e: _wandb_hint(e, mode, Path(os.environ.get("WANDB_DIR") or run_dir / "wandb")))
        if resume_step is not None:  # (also W&B turned on at a resume: the history before it)
            try:
                wandb.backfill(jsonl.records())
            except Exception as e:  # noqa: BLE001 - W&B started: its history is worth a line, not the run
                print(f"warning: tracking: W&B: the points kept in metrics.jsonl were not sent ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]}); they are in {run_dir / 'metrics.jsonl'}", file=sys.stderr, flush=True)
        trackers.append(wandb)
    return MultiTracker(trackers)


def _wandb_hint(error: Exception, mode: str, directory: Path) -> str:
    if isinstance(error, ImportError):
        return "; install it (pip install wandb, or the package's [wandb] extra), or set tracking.wandb=false"
    if mode in ("offline", "dryrun") and isinstance(error, OSError):
        return (f"; W&B writes an offline run under {directory} (WANDB_DIR, else the run directory): "
                "point WANDB_DIR at a writable directory, or set tracking.wandb=false")
    if mode in ("offline", "dryrun"):  # (not "set WANDB_MODE=offline": it is)
        return "; set tracking.wandb=false to run without W&B"
    return "; set WANDB_MODE=offline (or tracking.wandb_mode=offline), log in, or set tracking.wandb=false"


def _starting(what: str, uri: str, started: list, start, hint: str | Callable[[Exception], str] = ""):
    """start(), or one line (exit 2) when a tracker cannot start: no traceback, the URI's
    secrets redacted from whatever the library said, and the trackers already started
    undone (an MLflow run this attempt created is deleted, a resumed one ends FAILED), so
    the corrected rerun finds nothing in its way."""
    try:
        return start()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - every library failure becomes the one line
        for tracker in started:
            tracker.abandon()
        if callable(hint):
            hint = hint(e)
        said = " ".join(str(e).split()) or type(e).__name__
        half = re.search(r"table \w+ already exists", said) if uri.startswith("sqlite:///") else None
        if half:  # a store killed mid-build before 2026-12-06 (build_sqlite_store)
            hint = (f"; {uri[len('sqlite:///'):]} was left half-built by a run killed while MLflow created its tables "
                    "(it holds no run): remove it, unless another run is creating it at this moment")
            said = half[0]  # (not the SQL statement behind it)
        raise ConfigError(f"tracking: {what} did not start: {redact_text(said, uri)[:300]}{hint}") from None
