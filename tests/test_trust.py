"""What a run trusts from its environment."""

from __future__ import annotations

import torch

from conftest import FAST, NO_MLFLOW, TINY, check, launcher


def test_a_stray_fault_hook_outside_the_test_suite_is_ignored_with_one_warning(tmp_path):
    """LAUNCHER_SAVE_ERROR makes rank 0's save of step 1 fail in the test suite; in a user's run
    (no LAUNCHER_TESTING) the same variable changes nothing but a warning line."""
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "train.max_steps=2", "checkpoint.every_steps=1",
            "eval.at_start=false", *FAST, *NO_MLFLOW]
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
            "tracking.wandb=true", "train.max_steps=2", "eval.at_start=false", *FAST]
    failed = launcher(*args, env={"WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_DIR": str(tmp_path)})
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 2 and len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert errors[0].startswith("error: tracking: W&B (online) did not start: ") and "WANDB_MODE=offline" in errors[0]
    assert "s3cret" not in failed.stdout + failed.stderr
    assert not (tmp_path / "out").exists()
    with sqlite3.connect(tmp_path / "shared.db") as db:
        assert db.execute("select lifecycle_stage from runs").fetchall() == [("deleted",)]

    # offline, into a WANDB_DIR it cannot write: the line says so, not "set WANDB_MODE=offline"
    (tmp_path / "afile").write_text("")
    unwritable = launcher(*args, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "afile" / "sub")})
    errors = [line for line in unwritable.stderr.splitlines() if line.startswith("error:")]
    assert unwritable.returncode == 2 and len(errors) == 1 and "Traceback" not in unwritable.stderr, unwritable.stderr[-3000:]
    assert errors[0].startswith("error: tracking: W&B (offline) did not start: ") and errors[0].endswith(
        f"W&B writes an offline run under {tmp_path / 'afile' / 'sub'} (WANDB_DIR, else the run directory): point "
        "WANDB_DIR at a writable directory, or set tracking.wandb=false"), errors[0]
    assert not (tmp_path / "out").exists()
    check(launcher(*args, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}))
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri.split("?")[0])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["tracking.uri"] == uri.replace("s3cret-tok", "***")
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if "s3cret" in v]
    assert "s3cret" not in (tmp_path / "out" / "r" / "config.yaml").read_text()


_PAYLOAD = """
import os, pickle, sys
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {sys.argv[2]}",))
with open(sys.argv[1], "wb") as f:
    pickle.dump(Payload(), f)
"""


def test_a_checkpoint_from_elsewhere_is_not_unpickled_unless_trusted(tmp_path):
    """A checkpoint signed under another user's key (LAUNCHER_KEY_FILE stands for the other
    user) is refused before anything is unpickled, even after its random state was replaced by a
    payload; one of this user's own is resumed without a word; `checkpoint.trust=true` loads a
    foreign one that is harmless."""
    import json
    import subprocess
    import sys

    base = ["train", str(TINY), "--output-dir", str(tmp_path), "train.max_steps=3", "checkpoint.every_steps=2",
            "eval.at_start=false", "eval.every_steps=0", *FAST, *NO_MLFLOW]
    check(launcher(*base, "--run-name", "theirs", env={"LAUNCHER_KEY_FILE": str(tmp_path / "their.key")}))
    check(launcher(*base, "--run-name", "mine"))
    theirs, mine = (tmp_path / n / "checkpoints" / "step-000002" for n in ("theirs", "mine"))
    assert json.loads((mine / "COMPLETE").read_text())["signature"]

    # Their checkpoint, with a payload in place of its random state: refused, payload never run.
    poisoned = tmp_path / "poisoned"
    subprocess.run(["cp", "-r", str(theirs), str(poisoned)], check=True)
    subprocess.run([sys.executable, "-c", _PAYLOAD, str(poisoned / "random_states_0.pkl"), str(tmp_path / "pwned")], check=True)
    proc = launcher(*base, "--run-name", "a", f"checkpoint.resume={poisoned}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: checkpoint.resume: {poisoned} was not written by your launcher (no signature "
                                "of yours, or its files changed since), and loading it unpickles ")
    assert "random_states_0.pkl" in errors[0] and errors[0].endswith(
        ", which can run any code; set checkpoint.trust=true if you trust where it came from")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "a").exists()

    # A copy of this user's own checkpoint, its random state swapped for a payload of the same
    # size (padded: unpickling stops at the payload's end): the signature covers small pickles' bytes.
    swapped = tmp_path / "swapped"
    subprocess.run(["cp", "-r", str(mine), str(swapped)], check=True)
    state = swapped / "random_states_0.pkl"
    size = state.stat().st_size
    subprocess.run([sys.executable, "-c", _PAYLOAD, str(state), str(tmp_path / "pwned")], check=True)
    state.write_bytes(state.read_bytes().ljust(size, b"\0"))
    assert state.stat().st_size == size
    proc = launcher(*base, "--run-name", "a", f"checkpoint.resume={swapped}")
    assert proc.returncode == 2 and "no signature of yours, or its files changed since" in proc.stderr
    assert not (tmp_path / "pwned").exists()

    # This user's own checkpoint, named by path from another run: resumed.
    proc = check(launcher(*base, "--run-name", "b", f"checkpoint.resume={mine}"))
    assert f"resuming from {mine}" in proc.stdout.splitlines() and (tmp_path / "b" / "model").is_dir()
    # Theirs, harmless and trusted by the user: resumed to the same final weights as mine.
    check(launcher(*base, "--run-name", "c", f"checkpoint.resume={theirs}", "checkpoint.trust=true"))
    from safetensors.torch import load_file

    for run in ("b", "c"):
        want, got = load_file(tmp_path / "mine" / "model" / "model.safetensors"), load_file(tmp_path / run / "model" / "model.safetensors")
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_run_checkpoint_damaged_after_its_seal_is_one_line_naming_the_intact_one_before_it(tmp_path):
    """A sealed checkpoint whose file was cut short later (a bad copy) was a traceback from
    deep inside the load on auto-resume and in `launcher export`. The marker lists every
    file's size: refused in one line naming the file and the intact checkpoint before it;
    removed, the run resumes from that one. A file added inside is no damage: resumed."""
    import os
    import shutil

    base = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", "train.max_steps=6",
            "checkpoint.every_steps=2", "eval.at_start=false", "eval.every_steps=0", "tracking.mlflow=false", *FAST]
    check(launcher(*base, "train.halt_at_step=4"))
    run = tmp_path / "r"
    shutil.copytree(run, tmp_path / "copy")
    step4 = run / "checkpoints" / "step-000004"
    weights = step4 / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    (step4 / "optimizer.bin").unlink()

    proc = launcher(*base)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0] == (f"error: checkpoint.resume: {step4} lost files or changed their size after it was sealed "
                         f"(model.safetensors: {size // 2:,} bytes, sealed at {size:,}; optimizer.bin: missing), so it "
                         "cannot be loaded as written; remove it to resume from step-000002 (or set "
                         "checkpoint.trust=true to load it as it is)")
    assert not (run / "config_history.jsonl").exists()  # the dropped halt_at_step was not recorded
    proc = launcher("export", str(step4), str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    damage = f"(model.safetensors: {size // 2:,} bytes, sealed at {size:,}; optimizer.bin: missing)"
    assert proc.stderr.splitlines()[-1] == (f"error: {step4}: files were removed or changed size after it was sealed "
                                            f"{damage}; export another checkpoint, or pass --trust-checkpoint to export "
                                            "it as it is")
    proc = launcher("export", str(step4), str(tmp_path / "out"), "--trust-checkpoint")  # as it is: its weights are cut
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    assert proc.stderr.splitlines()[-1] == (f"error: {step4}: its weights cannot be read: files were removed or changed "
                                            f"size after it was sealed {damage}")

    shutil.rmtree(step4)
    assert f"resuming from {run / 'checkpoints' / 'step-000002'}" in check(launcher(*base)).stdout.splitlines()

    # The intact copy with a file added inside its newest checkpoint (a converter's output):
    # no damage, resumed (the first version of this check, by signature, refused it).
    (tmp_path / "copy" / "checkpoints" / "step-000004" / "NOTES.txt").write_text("converted with zero_to_fp32.py\n")
    proc = check(launcher(*base[:4], "--run-name", "copy", *base[6:]))
    assert f"resuming from {tmp_path / 'copy' / 'checkpoints' / 'step-000004'}" in proc.stdout.splitlines()


def test_export_reads_shards_of_a_foreign_checkpoint_only_when_trusted(tmp_path):
    """ZeRO shards are pickles: a checkpoint without this user's signature is refused before
    DeepSpeed's reader opens them."""
    ckpt = tmp_path / "step-000002"
    (ckpt / "skeleton").mkdir(parents=True)
    (ckpt / "skeleton" / "config.json").write_text("{}")
    (ckpt / "COMPLETE").write_text("")
    (ckpt / "latest").write_text("global_step2")
    (ckpt / "global_step2").mkdir()
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", _PAYLOAD, str(ckpt / "global_step2" / "mp_rank_00_model_states.pt"),
                    str(tmp_path / "pwned")], check=True)
    proc = launcher("export", str(ckpt), str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: launcher export: {ckpt} was not written by your launcher (its COMPLETE marker is unsigned: written by "
        "hand, by a launcher before signing, or without a key), and loading it unpickles "
        "global_step2/mp_rank_00_model_states.pt, which can run any code; pass --trust-checkpoint if you trust where it "
        "came from")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_a_key_that_cannot_be_made_never_costs_a_checkpoint(tmp_path):
    """A read-only home (common on compute nodes): checkpoints are written unsigned, with one
    warning, and resume in their own run directory as always."""
    env = {"LAUNCHER_KEY_FILE": "/proc/no-such-dir/checkpoint.key"}
    args = ["train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", "train.max_steps=4",
            "checkpoint.every_steps=1", "eval.at_start=false", "eval.every_steps=0", *FAST, *NO_MLFLOW]
    proc = check(launcher(*args, "train.halt_at_step=2", env=env))
    warnings = [line for line in proc.stderr.splitlines() if "checkpoints are written unsigned" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoints are written unsigned (/proc/no-such-dir/")
    import json

    marker = json.loads((tmp_path / "r" / "checkpoints" / "step-000002" / "COMPLETE").read_text())
    assert marker["signature"] is None and "model.safetensors" in marker["files"]  # sizes are listed without a key
    resumed = check(launcher(*args, env=env))
    step2 = tmp_path / "r" / "checkpoints" / "step-000002"
    assert f"resuming from {step2}" in resumed.stdout.splitlines() and (tmp_path / "r" / "model").is_dir()


def test_a_key_is_made_beside_a_temporary_a_failed_attempt_left(tmp_path, monkeypatch):
    """The key was written through a temporary named by the process id and created exclusively:
    one left by a write that failed (a full disk) refused every later process with that id (ids
    repeat in containers) a key, so their checkpoints went unsigned and needed --trust-checkpoint."""
    import os

    from launcher import trust

    path = tmp_path / "keys" / "checkpoint.key"
    path.parent.mkdir()
    (path.parent / f".{path.name}.{os.getpid()}.tmp").write_text("")  # the failed attempt's
    monkeypatch.setenv("LAUNCHER_KEY_FILE", str(path))
    key = trust._key(create=True)
    assert key is not None and len(key) == 32 and path.read_text().strip() == key.hex()
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{path.name}.{os.getpid()}.tmp", path.name]


CUSTOM_CODE = """import os, pathlib
pathlib.Path(os.environ["CUSTOM_CODE_RAN"]).write_text("ran")
from transformers import BertConfig, BertForSequenceClassification


class CustomConfig(BertConfig):
    pass


class CustomModel(BertForSequenceClassification):
    config_class = CustomConfig
"""


def test_a_model_that_ships_python_code_is_loaded_only_with_trust_remote_code(tmp_path, trained_binary):
    """An export (or a checkpoint's skeleton) whose config.json maps classes to Python files
    beside it runs them when loaded: eval, predict and export refuse it in one line, without
    running it, and load it with --trust-remote-code."""
    import json
    import shutil

    from conftest import exported_checkpoint

    _, run = trained_binary
    model_dir = tmp_path / "custom"
    shutil.copytree(run / "model", model_dir)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(exported_checkpoint(run), ckpt)
    auto_map = {"AutoConfig": "modeling_custom.CustomConfig",
                "AutoModelForSequenceClassification": "modeling_custom.CustomModel"}
    for where in (model_dir, ckpt / "skeleton"):
        assert (where / "config.json").is_file()
        config = json.loads((where / "config.json").read_text())
        (where / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
        (where / "modeling_custom.py").write_text(CUSTOM_CODE)
    marker = tmp_path / "ran"
    env = {"CUSTOM_CODE_RAN": str(marker), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    (tmp_path / "in.txt").write_text("We may terminate your account at any time.\n")
    data = run / "data" / "validation.jsonl"
    commands = {"eval": ["eval", str(model_dir), "--data", str(data)],
                "predict": ["predict", str(model_dir), "--input", str(tmp_path / "in.txt")],
                # (its skeleton's config.json edited here: exported as it is, past the seal's sizes)
                "export": ["export", str(ckpt), str(tmp_path / "out"), "--trust-checkpoint"]}
    for name, args in commands.items():
        refused = launcher(*args, env=env)
        where = ckpt / "skeleton" if name == "export" else model_dir
        assert refused.returncode == 2 and refused.stderr.strip() == (
            f"error: {where}: loading it runs Python code shipped with the model (modeling_custom.py, named by "
            "auto_map); pass --trust-remote-code if you trust it"), (name, refused.stderr[-2000:])
        assert not marker.exists() and not (tmp_path / "out").exists()
    for name, args in commands.items():
        check(launcher(*args, "--trust-remote-code", env=env))
        assert marker.read_text() == "ran", name
        marker.unlink()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"] == auto_map


def test_auto_map_without_its_files_runs_nothing_and_needs_no_flag(tmp_path):
    """Some configs keep auto_map for a class transformers now has built in (Phi-3's), or name
    another repository's code ("repo--module.Class"): no file beside the model runs, so no flag."""
    import json

    from launcher.errors import ConfigError
    from launcher.models import remote_code_gate

    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                                                                   "AutoModel": "org/repo--modeling_x.XModel"}}))
    assert remote_code_gate(tmp_path, False) == {"trust_remote_code": False}
    (tmp_path / "configuration_phi3.py").write_text("")
    try:
        remote_code_gate(tmp_path, False)
        raise AssertionError("a shipped file must be refused")
    except ConfigError as e:
        assert "(configuration_phi3.py, named by auto_map)" in str(e)


def test_links_and_a_latest_file_cannot_lead_a_load_outside_the_checked_checkpoint(tmp_path):
    """Two ways past the check, found by reading the loaders: the listing did not enter a linked
    directory, so an FSDP shard directory linked to a payload elsewhere counted as "no pickles"
    (and DCP unpickled its .metadata); and DeepSpeed joined the text of `latest` to the path,
    so "../payload" loaded shards from outside. A link is refused now, and the tag is named."""
    import subprocess
    import sys

    payload = tmp_path / "payload"
    payload.mkdir()
    subprocess.run([sys.executable, "-c", _PAYLOAD, str(payload / ".metadata"), str(tmp_path / "pwned")], check=True)
    subprocess.run([sys.executable, "-c", _PAYLOAD, str(payload / "mp_rank_00_model_states.pt"), str(tmp_path / "pwned")],
                   check=True)
    for name in ("linked", "latest"):
        ckpt = tmp_path / name / "step-000002"
        (ckpt / "skeleton").mkdir(parents=True)
        (ckpt / "skeleton" / "config.json").write_text("{}")
        (ckpt / "COMPLETE").write_text("")
        if name == "linked":
            (ckpt / "pytorch_model_fsdp_0").symlink_to(payload, target_is_directory=True)
        else:
            (ckpt / "latest").write_text("../../payload")
        proc = launcher("export", str(ckpt), str(tmp_path / f"out-{name}"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        if name == "linked":
            assert proc.stderr.strip().startswith(f"error: launcher export: {ckpt} holds symbolic links "
                                                  "(pytorch_model_fsdp_0), which no checkpoint of launcher holds")
        assert not (tmp_path / "pwned").exists(), name
