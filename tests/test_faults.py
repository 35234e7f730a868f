"""kill -9 anywhere: a 2-rank run is killed whole (SIGKILL to `accelerate launch` and every
rank) at a fail point, then the same command resumes (`checkpoint.resume: auto`).

Each case checks: the latest complete checkpoint is the one resumed; whatever was left
half-written (a checkpoint's temp directory, a half export) is reported, removed and never
loaded or counted for retention; the final weights equal an uninterrupted one-process run's
(tests/test_distributed.py gives the tolerance); the MLflow run is the same one with every
step once. By default one kill point per engine (DDP, ZeRO-2); `-m faults` adds five per
engine for DDP, ZeRO-2, ZeRO-3 and ZeRO-3 with LoRA.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from conftest import FAST, TINY, check, launcher
from test_distributed import ACCEL, TOL, accelerate_launch, max_diff, metric_steps, weights

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ENGINES = {"ddp": ("cpu_ddp.yaml", []), "zero2": ("deepspeed_zero2.yaml", []), "zero3": ("deepspeed_zero3.yaml", []),
           "zero3_lora": ("deepspeed_zero3.yaml", ["model.lora.enabled=true"])}
# 12 steps, a checkpoint and an eval every 4, the last two checkpoints kept (clause_tiny.yaml).
STEPS = ["train.max_steps=12", "eval.every_steps=4", "checkpoint.every_steps=4"]
POINTS = ["step:5", "checkpoint:8", "step:10", "checkpoint:12", "export"]
DEFAULT = {("ddp", "checkpoint:8"), ("zero2", "export")}
KEPT = {"step:5": [4], "checkpoint:8": [4], "step:10": [4, 8], "checkpoint:12": [4, 8], "export": [8, 12]}
CASES = [pytest.param(e, p, marks=() if (e, p) in DEFAULT else pytest.mark.faults) for e in ENGINES for p in POINTS]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One uninterrupted process per model variant (plain, LoRA), built on first use."""
    built = {}

    def get(extra: tuple) -> Path:
        if extra not in built:
            out = tmp_path_factory.mktemp("ref")
            check(launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "ref", *FAST, *STEPS, *extra))
            built[extra] = out / "ref"
        return built[extra]

    return get


def _kill_tree_when_stopped(proc, timeout: float = 600) -> None:
    """Wait until a process of the launch stops at the fail point, then SIGKILL them all."""
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    def stopped(p) -> bool:
        try:
            return p.status() == psutil.STATUS_STOPPED
        except psutil.NoSuchProcess:  # a short-lived child (git, a compiler probe) ended meanwhile
            return False

    while True:
        tree = [root, *root.children(recursive=True)]
        if any(stopped(p) for p in tree):
            break
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before its fail point: {proc.communicate()}"
        assert time.monotonic() < deadline, "the fail point was never reached"
        time.sleep(0.05)
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # the launch itself was killed, not ended


@pytest.mark.parametrize("engine,point", CASES)
def test_killed_anywhere_resumes_to_the_uninterrupted_weights(engine, point, tmp_path, references, monkeypatch):
    yaml, extra = ENGINES[engine]
    launch = ["--config_file", str(ACCEL / yaml), "--num_processes", "2"]
    run = tmp_path / "k"
    monkeypatch.setenv("LAUNCHER_FAILPOINT", point)
    proc = accelerate_launch(launch, tmp_path, "k", *extra, wait=False, base=FAST + STEPS)
    _kill_tree_when_stopped(proc)
    monkeypatch.delenv("LAUNCHER_FAILPOINT")
    assert not (run / "model").exists()
    ckpts = run / "checkpoints"
    complete = sorted(p.name for p in ckpts.iterdir() if (p / "COMPLETE").is_file()) if ckpts.is_dir() else []
    kind, _, at = point.partition(":")
    kept = [f"step-{s:06d}" for s in KEPT[point]]
    assert set(kept) <= set(complete) and complete[-1] == kept[-1]  # (the best eval's may stay too)
    left = sorted(p.name for p in ckpts.iterdir() if not (p / "COMPLETE").is_file()) if ckpts.is_dir() else []
    if kind == "checkpoint":
        assert left == [f".tmp-step-{int(at):06d}"]  # the half-written save is there, unsealed
    if kind == "export":
        assert (run / "model.tmp").is_dir()

    resumed = check(accelerate_launch(launch, tmp_path, "k", *extra, base=FAST + STEPS))
    assert f"resuming from {ckpts / complete[-1]}" in resumed.stdout
    if left or kind == "export":
        line = next(x for x in resumed.stdout.splitlines() if x.startswith("ignoring what a killed attempt"))
        assert all(name in line for name in left + (["model.tmp"] if kind == "export" else []))
    names = sorted(p.name for p in ckpts.iterdir())
    assert all((ckpts / n / "COMPLETE").is_file() for n in names)  # nothing partial kept
    assert names[-2:] == ["step-000008", "step-000012"]
    assert not (run / "model.tmp").exists()
    assert max_diff(weights(run), weights(references(tuple(extra)))) < TOL
    steps, _ = metric_steps(tmp_path, "train/loss")  # one MLflow run across both attempts
    assert steps == list(range(1, 13)), steps  # every step once, whichever attempt logged it
    assert metric_steps(tmp_path, "eval/macro_f1")[0] == [0, 4, 8, 12]
