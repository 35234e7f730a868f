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


def test_a_tracker_that_cannot_start_is_one_line_leaves_nothing_and_never_shows_a_uri_secret(tmp_path):
    """W&B online without a login (its usual failure on a cluster): exit 2, one line, no
    traceback; the MLflow run already created is deleted and the run directory removed, so the
    rerun with WANDB_MODE=offline goes through. The store URI's query token appears nowhere:
    not in the output, not in the logged params."""
    import sqlite3

    uri = f"sqlite:///{tmp_path}/shared.db?token=s3cret-tok"
    args = ["train", str(TINY), "--output-dir", str(tmp_path / "out"), "--run-name", "r", f"tracking.uri={uri}",
            "tracking.wandb=true", "train.max_steps=2", "eval.at_start=false"]
    failed = launcher(*args, env={"WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_DIR": str(tmp_path)})
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 2 and len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert errors[0].startswith("error: tracking: W&B (online) did not start: ") and "WANDB_MODE=offline" in errors[0]
    assert "s3cret" not in failed.stdout + failed.stderr
    assert not (tmp_path / "out").exists()
    with sqlite3.connect(tmp_path / "shared.db") as db:
        assert db.execute("select lifecycle_stage from runs").fetchall() == [("deleted",)]

    check(launcher(*args, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}))
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri.split("?")[0])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["tracking.uri"] == uri.replace("s3cret-tok", "***")
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if "s3cret" in v]
    assert "s3cret" not in (tmp_path / "out" / "r" / "config.yaml").read_text()
