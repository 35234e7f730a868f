"""MLflow + W&B + a local metrics.jsonl behind one facade; real only on global rank 0.

`start_tracking` is the single place that decides who logs: rank 0 gets the real
trackers, every other rank gets `Tracker()`, whose methods do nothing, so the
loop calls the tracker unconditionally and holds no rank checks.

Train metrics are buffered and sent in batches (`log_batch`): one synchronous
MLflow call costs tens of ms, longer than a tiny training step (NOTES.md).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from launcher import __version__


class Tracker:
    """No-op tracker (non-zero ranks, or everything disabled)."""

    name = "none"
    run_id: str | None = None

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_table(self, rows: list[dict], name: str, step: int) -> None:
        """Rows of one table (same keys each), appended to the run's table `name`."""

    def flush(self) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def ids(self) -> dict:
        return {}


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None, artifact_root: str | None, tags: dict):
        import os

        from mlflow.tracking import MlflowClient

        from launcher.config import redact_uri

        if redact_uri(uri) != uri:  # mlflow prints "View run ... at <uri>", password included
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = self.client.create_experiment(experiment, artifact_location=artifact_root)
        else:
            exp_id = exp.experiment_id
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.resumed = True
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            self.resumed = False
        self.client.set_tag(self.run_id, "launcher.attempts", str(int(self._tag("launcher.attempts") or 0) + 1))
        self._buffer: list = []

    def _tag(self, key: str):
        return self.client.get_run(self.run_id).data.tags.get(key)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params if self.resumed else {}
        # MLflow forbids changing a logged param; a resumed run keeps the first values.
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path, artifact_path=None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, rows, name, step) -> None:
        # MLflow appends to an existing table artifact; the UI compares it across steps and runs.
        self.client.log_table(self.run_id, data={k: [r[k] for r in rows] for k in rows[0]}, artifact_file=f"{name}.json")

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    def ids(self) -> dict:
        return {"mlflow": self.run_id}


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, project: str, run_name: str, run_id: str | None, mode: str, directory: Path, tags: dict):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=run_name,
            id=run_id or secrets.token_hex(4),
            resume="allow",
            mode=mode,
            dir=str(directory),
            tags=[f"{k}={v}" for k, v in tags.items()][:20],
        )
        self.run_id = self.run.id

    def log_params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, path, artifact_path=None) -> None:
        self.run.save(str(path), base_path=str(Path(path).parent), policy="now")

    def log_table(self, rows, name, step) -> None:
        import wandb

        columns = list(rows[0])
        self.run.log({name: wandb.Table(columns=columns, data=[[r[k] for k in columns] for r in rows])}, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def ids(self) -> dict:
        return {"wandb": self.run_id}


class JsonlTracker(Tracker):
    """metrics.jsonl in the run directory: the local record the plot and final table use.
    On resume, records past the resumed step (logged before an interruption) are dropped."""

    name = "jsonl"

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.is_file():
            kept = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(l + "\n" for l in kept))
            tmp.replace(path)
        self._f = open(path, "a")

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def flush(self) -> None:
        self._f.flush()

    def finish(self, status: str = "FINISHED") -> None:
        self._f.close()


class MultiTracker(Tracker):
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self.run_id = next((t.run_id for t in trackers if t.name == "mlflow"), None)

    def log_params(self, params):
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics, step):
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path, artifact_path=None):
        for t in self.trackers:
            t.log_artifact(path, artifact_path)

    def log_table(self, rows, name, step):
        for t in self.trackers:
            t.log_table(rows, name, step)

    def flush(self):
        for t in self.trackers:
            t.flush()

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


def check_reachable(cfg, timeout_s: float = 5.0) -> None:
    """An MLflow server that does not answer stops the start within seconds, with one line
    and before the run directory exists; left to itself the mlflow client retries for
    minutes without a word. Any HTTP answer (even an error status) counts as reachable."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    from launcher.config import redact_uri
    from launcher.errors import ConfigError

    uri = cfg.tracking_uri
    if not cfg.tracking.mlflow or not uri.startswith(("http://", "https://")):
        return
    parts = urlsplit(uri)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], path=parts.path.rstrip("/") + "/health"))
    try:
        urllib.request.urlopen(bare, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"tracking.uri: {redact_uri(uri)} does not answer ({reason}); start the server, "
                          "correct the URI, or set tracking.mlflow=false") from None


def warm_up(cfg, is_main: bool):
    """Start-up overlap: import mlflow and open its store (the default SQLite store creates
    its tables on first use, about 2 s) in a thread while the model loads. Nothing is
    created in the store but its schema; start_tracking joins the thread first, and its own
    errors are reported there, not here."""
    if not (is_main and cfg.tracking.mlflow):
        return None
    import threading

    def touch():
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=cfg.tracking_uri).get_experiment_by_name(cfg.tracking.experiment)
        except Exception:  # noqa: BLE001 - start_tracking meets the same problem and reports it
            pass

    thread = threading.Thread(target=touch, name="mlflow-warm-up", daemon=True)
    thread.start()
    _WARMING.append(thread)
    return thread


_WARMING: list = []


def settle() -> None:
    """Wait for a warm-up still touching the store (before removing what a failed start made)."""
    while _WARMING:
        _WARMING.pop().join()


def start_tracking(cfg, is_main: bool, facts: dict, run_dir: Path, resume_ids: dict | None, resume_step: int | None,
                   warm=None) -> Tracker:
    """Real trackers on the logging rank, a no-op everywhere else."""
    if warm is not None:
        warm.join()
    if not is_main:
        return Tracker()
    resume_ids = resume_ids or {}
    tags = run_tags(facts)
    trackers: list[Tracker] = [JsonlTracker(run_dir / "metrics.jsonl", resume_step)]
    t = cfg.tracking
    if t.mlflow:
        artifact_root = None
        if not t.uri:  # default SQLite store: artifacts beside it, not in ./mlruns of the cwd
            artifact_root = (Path(cfg.output_dir) / "mlartifacts").resolve().as_uri()
        trackers.append(MLflowTracker(cfg.tracking_uri, t.experiment, cfg.run_name, resume_ids.get("mlflow"), artifact_root, tags))
    if t.wandb and t.wandb_mode != "disabled":
        trackers.append(WandbTracker(t.wandb_project, cfg.run_name, resume_ids.get("wandb"), t.wandb_mode, run_dir / "wandb", tags))
    return MultiTracker(trackers)
