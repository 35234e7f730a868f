"""Shared helpers. Everything runs on CPU, offline: tiny models, generated data."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = CONFIGS / "train" / "clause_tiny.yaml"

# No hub at run time: make any accidental hub access fail fast instead of retrying.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
os.environ.update(OFFLINE_ENV)
os.environ["LAUNCHER_TESTING"] = "1"  # the fault-injection hooks (launcher/faults.py) act only in tests
# The key that signs checkpoints (launcher/trust.py): the suite's own, not the user's ~/.config.
# Made by the first process of the session (pytest-xdist's workers inherit it), which removes it.
if "LAUNCHER_KEY_FILE" not in os.environ:
    _KEY_DIR = tempfile.mkdtemp(prefix="launcher-key-")
    atexit.register(shutil.rmtree, _KEY_DIR, ignore_errors=True)
    os.environ["LAUNCHER_KEY_FILE"] = str(Path(_KEY_DIR) / "checkpoint.key")
# DeepSpeed's kernels (its CPU collectives, CPU Adam) build into the suite's own folder, not the
# user's ~/.cache/torch_extensions. torch's builder takes <folder>/<kernel>/lock at each process's
# first load of a kernel, even one built long ago (it rechecks the build); a process killed at
# that moment (a test session stopped with kill -9) leaves the lock, and every later DeepSpeed
# launch waits on it (launcher refuses them once it is 10 minutes old: engines.stale_build_locks).
# In the suite's folder a lock at the session's start is a killed session's, or another
# session's build at work in this checkout: clear_build_locks waits for that one to end.
SUITE_EXTENSIONS = ROOT / "build" / "torch_extensions"
os.environ["TORCH_EXTENSIONS_DIR"] = str(SUITE_EXTENSIONS)


def clear_build_locks(folder: Path, quiet_s: float = 120, poll_s: float = 2, say=print) -> list[Path]:
    """Removes the kernel build locks in `folder` whose kernel folder has not changed for quiet_s
    (a build at work writes its objects there; a check of a built kernel holds its lock for
    well under a second), waiting while a younger one is there; the ones it removed."""
    import time

    from launcher.engines import quiet_for

    removed: list[Path] = []
    waited = False
    while locks := sorted(folder.glob("*/lock")):
        for lock in locks:
            try:
                if quiet_for(lock, time.time()) >= quiet_s:
                    lock.unlink()
                    removed.append(lock)
                    say(f"removed {lock}: a killed kernel build left it")
            except OSError:  # gone meanwhile: its build ended
                pass
        if any(lock.exists() for lock in locks):
            if not waited:
                say(f"waiting for a kernel build in {folder} (a lock unchanged for {quiet_s:.0f} s is removed)")
                waited = True
            time.sleep(poll_s)
    return removed


def pytest_sessionstart(session):
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller did it
        return
    clear_build_locks(SUITE_EXTENSIONS, say=lambda line: print(line, file=sys.stderr))


# Small and fast: 384 rows / 32 per step = 12 steps per epoch; 100 validation rows
# do not divide by the eval batch, so metrics must still count each row once.
FAST = [
    "data.synthetic.n_train=384",
    "data.synthetic.n_validation=100",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=400",
]


def launcher(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
             unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `python -m launcher ...` in a fresh process, as a user would; `unset` names variables
    of this process's environment that it runs without."""
    full_env = {k: v for k, v in {**os.environ, **OFFLINE_ENV, **(env or {})}.items() if k not in unset}
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (wandb ships no reader for it): launcher's own reader,
    which a resume uses to find what a killed attempt's file holds."""
    from launcher.tracking import wandb_file_records

    assert path.read_bytes()[:4] == b":W&B", path
    return wandb_file_records(path)


def communicate_or_kill(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """proc.communicate, but a launch that outlives the timeout is killed with every process
    under it (a stalled rank would otherwise sleep on after the test failed)."""
    import psutil

    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.communicate(timeout=60)
        raise


def mlflow_client(out_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")


def all_runs(client):
    exps = client.search_experiments()
    return client.search_runs([e.experiment_id for e in exps]) if exps else []


# For launches whose tests read no tracker: MLflow's import and a new SQLite store's schema add
# about 5 s to a tiny run's start on 2 cores (16 s against 10). The tracker has its own tests
# (test_tracking.py, and those that read the runs' MLflow records).
NO_MLFLOW = ["tracking.mlflow=false"]

TWELVE_STEPS = ["train.max_steps=12", "eval.every_steps=6", "checkpoint.every_steps=6"]


@pytest.fixture(scope="session")
def twelve_steps(tmp_path_factory) -> tuple[Path, Path]:
    """One process, 12 steps of the small demo (FAST): the reference that runs stopped, resumed,
    on 2 ranks or under Slurm must equal (output directory, run directory); built once per worker."""
    out = tmp_path_factory.mktemp("twelve")
    check(launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "ref", *FAST, *TWELVE_STEPS))
    return out, out / "ref"


@pytest.fixture(scope="session")
def trained_binary(tmp_path_factory):
    """One real training run of the demo recipe (100 steps), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("trained")
    check(launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "bin", "train.epochs=2"))
    return out, out / "bin"


def task_tokenizer(task, tmp_path: Path, rows: list[dict]):
    """A task's tokenizer for rows written to a JSONL file (a tiny model trains its own on them)."""
    import json

    from launcher.data import sources
    from launcher.data.cache import Cache

    path = tmp_path / "tokenizer-rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = sources.Source("file", str(path), "train", "data.train_file")
    return task.tokenizer(tmp_path / "tok", src, Cache(tmp_path / "cache", "test", candidate=True, others_wait=False))


def exported_checkpoint(run: Path) -> Path:
    """The checkpoint whose weights model/ holds (checkpoint.export: best may pick an earlier one)."""
    import json

    step = json.loads((run / "final_metrics.json").read_text())["exported_step"]
    return run / "checkpoints" / f"step-{step:06d}"
