"""RUN/job.json: who owns a run directory. The scheduler job that made it (a requeue of that job
may start again in place before any checkpoint), its tracker run ids (one MLflow run per job,
kept across resumes), and the other run's checkpoint it started from, if any (the same command
again goes on from this run's own checkpoints). No torch here: the config check reads it too."""

from __future__ import annotations

import json
from pathlib import Path

OWNER_FILE = "job.json"


def read_owner(run_dir: Path) -> dict:
    try:
        owner = json.loads((run_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def record_owner(run_dir: Path, job_id: str | None, tracker_ids: dict | None = None, started_from: Path | None = None) -> None:
    """Written whole (a rename), with the tracker ids once tracking has started (a checkpoint
    carries them too, but may not exist yet); `started_from` is kept when the ids come later."""
    owner = {"slurm_job_id": job_id, "tracker_ids": tracker_ids or {}}
    source = str(started_from.resolve()) if started_from else read_owner(run_dir).get("started_from")
    if source:
        owner["started_from"] = source
    tmp = run_dir / f".{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(owner))
    tmp.replace(run_dir / OWNER_FILE)


def started_from(run_dir: Path, checkpoint: str | Path) -> dict | None:
    """The run's record when it was started from that checkpoint of another run
    (checkpoint.resume=PATH), else None."""
    owner = read_owner(run_dir)
    return owner if owner.get("started_from") == str(Path(checkpoint).resolve()) else None
