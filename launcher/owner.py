"""RUN/job.json: who owns a run directory. The scheduler job that made it (a requeue of that job
may start again in place before any checkpoint), its tracker run ids (one MLflow run per job,
kept across resumes), and the other run's checkpoint it started from, if any (the same command
again goes on from this run's own checkpoints). No torch here: the config check reads it too."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from launcher.files import write_atomically
from launcher.trust import MARKER

OWNER_FILE = "job.json"


def read_owner(run_dir: Path) -> dict:
    try:
        owner = json.loads((run_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def record_owner(run_dir: Path, job_id: str | None, tracker_ids: dict | None = None, started_from: Path | None = None,
                 went_back_to: Path | None = None) -> None:
    """Written whole (a rename), with the tracker ids once tracking has started (a checkpoint
    carries them too, but may not exist yet); `started_from` (another run's checkpoint this
    one began from) and `went_back_to` (the run's own earlier checkpoint it was sent back to,
    checkpoint.resume=PATH) are kept when the ids come later."""
    owner = {"slurm_job_id": job_id, "tracker_ids": tracker_ids or {}}
    before = read_owner(run_dir)
    source = str(started_from.resolve()) if started_from else before.get("started_from")
    if source:
        owner["started_from"] = source
    if went_back_to is not None or before.get("went_back_to"):
        owner["went_back_to"] = str(went_back_to.resolve()) if went_back_to is not None else before["went_back_to"]
    write_atomically(run_dir / OWNER_FILE, json.dumps(owner))


def newer_than(run_dir: Path, checkpoint: Path) -> bool:
    """Whether job.json was written after the checkpoint was sealed (its marker)."""
    try:
        return (run_dir / OWNER_FILE).stat().st_mtime_ns > (checkpoint / MARKER).stat().st_mtime_ns
    except OSError:
        return False


def went_back_to(run_dir: Path, checkpoint: str | Path) -> bool:
    """Whether an earlier attempt of this run went back to that checkpoint of its own: the
    checkpoints after it are that attempt's history, which the same command goes on with."""
    return read_owner(run_dir).get("went_back_to") == str(Path(checkpoint).resolve())


def started_from(run_dir: Path, checkpoint: str | Path) -> dict | None:
    """The run's record when it was started from that checkpoint of another run
    (checkpoint.resume=PATH), else None."""
    owner = read_owner(run_dir)
    return owner if owner.get("started_from") == str(Path(checkpoint).resolve()) else None


# ---- the lease: one launch at a time in a run directory

LEASE_FILE = ".lease"
BEAT_S = 30.0  # the holder touches the lease this often
STALE_S = 300.0  # a lease untouched this long is a dead holder's (NFS may cache mtimes for 60 s)
WRITING_S = 10.0  # a lease still unreadable this long after it was made is a dead writer's


def lease_holder(run_dir: Path, job_id: str | None) -> tuple[dict | None, bool]:
    """RUN/.lease's holder, read without taking it (None: no lease, or one whose writer died
    half-way), and whether it is a dead launch's (kill -9, the OOM killer, a lost node: a
    launch that ends any other way releases it), as `Lease.take` judges. With ranks on several
    hosts, only what every host sees alike counts (the lease's age), not one host's pids, so
    that every rank decides alike. A container that shares its host's name but not its pids
    is judged by its own: as `take` does."""
    lease = Lease(run_dir, job_id)
    holder, age = lease._read()
    if holder is None or "pid" not in holder:
        return None, False
    world = os.environ.get("WORLD_SIZE", "1")
    one_host = os.environ.get("LOCAL_WORLD_SIZE", world) == world
    return holder, (lease._dead(holder, age) if one_host else age > STALE_S)


class Lease:
    """RUN/.lease, held by rank 0 of the launch training in RUN: a second launch into the same
    directory (a double submit, a requeue while the first job still runs) would delete the
    first's temp checkpoints, overwrite its checkpoints and rotate them away. Created with
    O_EXCL; a heartbeat thread touches it; released at exit. A lease is a dead holder's, and
    taken over, when its process is gone (same host), when it was this scheduler job's (a
    requeue: the earlier attempt is over), or when it went untouched for STALE_S seconds.
    Two launches taking over one dead holder's lease in the same instant can both win: the
    lease guards against the usual double submit, not against that race. Within one job the
    lease records the attempt (SLURM_RESTART_COUNT): a second launch in the same attempt (two
    trainings started in one allocation) is another live launch, not a requeue."""

    def __init__(self, run_dir: Path, job_id: str | None):
        import secrets
        import socket

        self.path = run_dir / LEASE_FILE
        self.job_id = job_id
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job_id,
                       "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0") if job_id is not None else None,
                       "token": secrets.token_hex(8)}
        self._stop: threading.Event | None = None

    def take(self) -> str | None:
        """None once held; else the one line naming the live holder."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age = self._read()
                if holder is not None and not self._dead(holder, age):
                    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
                    return (f"{self.path.parent} is in use by another launch (host {holder.get('host')}, pid "
                            f"{holder.get('pid')}{job}; its lease {self.path} was touched {age:.0f} s ago): wait for "
                            f"it to end, or choose another --run-name; if that launch is gone, remove {self.path}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            self._beat()
            return None
        return f"{self.path}: could not be created or taken over; remove it if no launch is training in {self.path.parent}"

    def _read(self) -> tuple[dict | None, float]:
        import time

        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text())
        except OSError:
            return None, 0.0  # gone meanwhile
        except ValueError:
            # Written by half: a holder between creating it and writing it is alive (read as
            # dead, its lease was taken over and two launches trained in one directory); one
            # that stays unreadable longer than WRITING_S died there.
            return ({"host": "unknown (its lease is being written)"} if age < WRITING_S else None), age
        return (holder if isinstance(holder, dict) else None), age

    def _dead(self, holder: dict, age: float) -> bool:
        import socket

        if age > STALE_S:
            return True
        if self.job_id is not None and holder.get("slurm_job_id") == self.job_id \
                and holder.get("slurm_restart") != self.record["slurm_restart"]:
            return True  # this job's earlier attempt (no attempt recorded: before 2026-12-05): a requeue starts once it ended
        return holder.get("host") == socket.gethostname() and not alive(holder.get("pid"))

    def _beat(self) -> None:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(BEAT_S):
                if not self._ours():
                    return
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        threading.Thread(target=beat, name="run-lease", daemon=True).start()
        self._stop = stop

    def _ours(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.record["token"]
        except (OSError, ValueError, AttributeError):
            return False

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        if self._ours():
            self.path.unlink(missing_ok=True)


def alive(pid) -> bool:
    """A process of this host is running (a zombie, which a container's init may never reap,
    is not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


_TAKEN: list[Lease] = []  # the leases this process took (take_lease)


def held_here(run_dir: Path) -> bool:
    """Whether this process holds RUN/.lease: it took the run directory (a launch that was
    refused, or failed before taking it, holds none there). By the lease's token, not by pid:
    two containers sharing a host name may each run a launch as pid 1."""
    return any(lease.path.parent == run_dir and lease._ours() for lease in _TAKEN)


def take_lease(run_dir: Path, job_id: str | None) -> str | None:
    """Rank 0, as the run directory is taken: None once this launch holds RUN/.lease (released
    when the process exits; a kill leaves it to the next launch's checks), else the line naming
    the launch that holds it."""
    import atexit

    lease = Lease(run_dir, job_id)
    refused = lease.take()
    if refused is None:
        atexit.register(lease.release)
        _TAKEN.append(lease)
    return refused
