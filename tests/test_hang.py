"""Hang triage on 2 CPU ranks: rank 1 sleeps inside step 5 (LAUNCHER_STALL) for longer than
train.hang_timeout_s. Every rank writes its stacks to RUN/ranks/rank-N.stack, rank 0 prints
which rank is behind and where each one is, and the run then finishes normally."""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import check
from test_distributed import ACCEL, accelerate_launch




@pytest.mark.slow
@pytest.mark.distributed
def test_a_stalled_rank_is_reported_with_every_ranks_stack(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_STALL", "1:5:20")
    proc = check(accelerate_launch(["--config_file", str(ACCEL / "cpu_ddp.yaml")], tmp_path, "h", "train.hang_timeout_s=8",
                                   "tracking.mlflow=false"))  # (rank 0's tracker work alone is no gap to report)
    ranks = tmp_path / "h" / "ranks"
    stacks = {r: (ranks / f"rank-{r:05d}.stack").read_text() for r in (0, 1)}
    assert "in stall" in stacks[1] and "faults.py" in stacks[1]  # rank 1's main thread, caught asleep
    assert "faults.py" not in stacks[0] and "distributed" in stacks[0]  # rank 0 waits for it in a collective
    out = proc.stdout.splitlines()
    start = next(i for i, x in enumerate(out) if x.startswith("hang watchdog: no progress on rank 0"))
    report = {int(x.split()[1].rstrip(":")): x for x in out[start + 1 : start + 3]}
    assert "step 4" in report[1] and "BEHIND" in report[1] and "faults.py" in report[1] and "in stall" in report[1], out[start:]
    assert "step 5" in report[0] and "BEHIND" not in report[0] and "trainer.py" in report[0], out[start:]
    assert sum(x.startswith("hang watchdog: no progress") for x in out) == 1  # one report for one stall
    assert any("making progress again" in x for x in out)
    assert (tmp_path / "h" / "model" / "model.safetensors").is_file()  # then the run finished


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("export", ["best", "last"])
def test_a_long_export_does_not_run_into_the_collective_timeout(tmp_path, monkeypatch, export):
    """Rank 0 takes 30 s to write the export (LAUNCHER_STALL=0:export:30) under a 20 s collective
    timeout: rank 1 waits on the file system, not in a barrier, and the run finishes. Slow is
    not hung there: the watchdog (20 s too) reports nothing. The export is the best
    evaluation's snapshot adopted, or the last step's weights written. (The timeouts leave the
    rest of the run room: on a loaded machine the ranks reach a collective seconds apart.)"""
    monkeypatch.setenv("LAUNCHER_STALL", "0:export:30")
    proc = accelerate_launch(["--config_file", str(ACCEL / "cpu_ddp.yaml")], tmp_path, "x", "train.collective_timeout_s=20",
                             "train.hang_timeout_s=20", f"checkpoint.export={export}", "train.lr=1e-9",
                             "tracking.mlflow=false")  # (no tracker work on rank 0 alone before a collective)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LAUNCHER_STALL: rank 0 sleeps 30 s at export" in proc.stderr.splitlines()  # the stall did happen
    summary = json.loads((tmp_path / "x" / "final_metrics.json").read_text())
    if export == "best":  # (lr 1e-9: evaluations tie, the earliest is best) its snapshot is what rank 0 adopts
        assert summary["exported_step"] == summary["best_step"] < summary["step"] == 12, summary
        assert os.path.samefile(tmp_path / "x" / "best" / "model.safetensors", tmp_path / "x" / "model" / "model.safetensors")
    else:
        assert summary["exported_step"] == summary["step"] == 12, summary
    assert "hang watchdog" not in proc.stdout + proc.stderr
    assert not list((tmp_path / "x" / "ranks").glob("*.stack"))
    assert (tmp_path / "x" / "model" / "model.safetensors").is_file()
    assert not list((tmp_path / "x").glob(".done-*")) and not list((tmp_path / "x").glob(".failed-*"))


def test_every_evaluation_batch_counts_as_progress(tmp_path):
    """An evaluation longer than train.hang_timeout_s is not a hang when its batches keep
    coming (watchdog.beating); one batch that takes longer than the timeout is."""
    from launcher.watchdog import Watchdog

    class Slow:
        dataset = list(range(12))

        def __init__(self, pause):
            self.pause = pause

        def __iter__(self):
            for i, pause in enumerate(self.pause):
                pause() if callable(pause) else time.sleep(pause)
                yield i

        def __len__(self):
            return len(self.pause)

    said = []
    dog = Watchdog(tmp_path / "ranks", 0, 1, 2.0, said.append)
    try:
        loader = dog.beating(Slow([0.1] * 35), 7, "eval")  # 3.5 s in all, 0.1 s between beats
        assert len(loader) == 35 and loader.dataset == list(range(12))
        assert list(loader) == list(range(35))
        assert not said and not (tmp_path / "ranks" / "rank-00000.stack").exists()
        assert list(dog.beating(Slow([0.0, lambda: _until(said)]), 8, "eval")) == [0, 1]  # a batch that waits on it
        assert "step 8 (eval)" in said[0], said
        assert (tmp_path / "ranks" / "rank-00000.stack").exists()
    finally:
        dog.close()


def test_an_earlier_attempts_progress_and_stacks_do_not_stand_in_for_this_ones(tmp_path):
    """A run killed at step 8 and resumed: its ranks/ kept rank-N.progress ("step 8") for good,
    and a hang report of the next attempt read a rank that never started as at step 8, and
    its old stack as where it is. Each rank clears its own at start (stacks kept aside), and
    a record older than this attempt is no rank's progress."""
    from launcher.watchdog import Watchdog

    ranks = tmp_path / "ranks"
    ranks.mkdir()
    old = {"step": 8, "phase": "train", "time": time.time() - 600}
    for r in (0, 1):
        (ranks / f"rank-0000{r}.progress").write_text(json.dumps({**old, "rank": r}))
    (ranks / "rank-00000.stack").write_text("the killed attempt's stack\n")
    said: list = []
    dog = Watchdog(ranks, 0, 2, 1.0, said.append)  # rank 1 never starts in this attempt
    try:
        assert not (ranks / "rank-00000.progress").exists() or json.loads((ranks / "rank-00000.progress").read_text())["step"] == 0
        assert (ranks / "rank-00000.stack.previous").read_text() == "the killed attempt's stack\n"
        _until(said)  # no beat: rank 0 reports after 1 s
    finally:
        dog.close()
    assert "  rank 1: no progress file (never started, or its file system is unreachable)" in said[0].splitlines(), said
    assert "  rank 0: step 0 (start)" in said[0], said


def test_a_long_checkpoint_is_slow_not_hung(tmp_path):
    """A save (phase "checkpoint") longer than train.hang_timeout_s is not reported: writing a
    70B checkpoint can take many minutes; its collectives keep the collective timeout. The
    same silence in training is."""
    from launcher.watchdog import Watchdog

    said = []
    dog = Watchdog(tmp_path / "ranks", 0, 1, 1.0, said.append)
    try:
        dog.beat(3, "checkpoint")
        time.sleep(2.5)
        assert not said and not (tmp_path / "ranks" / "rank-00000.stack").exists()
        dog.beat(3, "train")
        _until(said)
        assert "step 3 (train)" in said[0], said
    finally:
        dog.close()


def _until(said: list, within_s: float = 60.0) -> None:
    """Waits for the watchdog's first report (a loaded machine may wake its thread late)."""
    deadline = time.monotonic() + within_s
    while not said:
        assert time.monotonic() < deadline, "the watchdog said nothing"
        time.sleep(0.05)
