"""What a run trusts from its environment."""

from __future__ import annotations

from conftest import TINY, check, launcher


def test_a_stray_fault_hook_outside_the_test_suite_is_ignored_with_one_warning(tmp_path):
    """LAUNCHER_SAVE_ERROR makes rank 0's save of step 1 fail in the test suite; in a user's run
    (no LAUNCHER_TESTING) the same variable changes nothing but a warning line."""
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "train.max_steps=2", "checkpoint.every_steps=1",
            "eval.at_start=false"]
    hooks = {"LAUNCHER_SAVE_ERROR": "0:1", "LAUNCHER_STALL": "0:1:600"}
    proc = check(launcher(*args, "--run-name", "user", env={**hooks, "LAUNCHER_TESTING": "0"}))
    warnings = [line for line in proc.stderr.splitlines() if "fault-injection hooks" in line]
    assert warnings == ["warning: ignoring LAUNCHER_STALL, LAUNCHER_SAVE_ERROR: fault-injection hooks act only "
                        "in the test suite (LAUNCHER_TESTING=1)"]
    assert (tmp_path / "user" / "checkpoints" / "step-000001" / "COMPLETE").is_file()
    failed = launcher(*args, "--run-name", "suite", env={"LAUNCHER_SAVE_ERROR": "0:1"})
    assert failed.returncode != 0 and "injected save failure (LAUNCHER_SAVE_ERROR) on rank 0 at step 1" in failed.stderr
