"""Ctrl-C is a stop: the first SIGINT checkpoints at the end of the step in progress and exits
with the resume line, like a scheduler's SIGTERM; a second one exits at once, in one line and
without a traceback. Before the first checkpoint, what that leaves does not block the same
command: it starts again in place. On one process (`launcher train`) and on two ranks
(`launcher train --accelerate-config`, whose launch forwards each Ctrl-C to the ranks)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, FAST, OFFLINE_ENV, ROOT, TINY, TWELVE_STEPS, all_runs, check, communicate_or_kill, launcher, mlflow_client

pytestmark = pytest.mark.slow

STEPS = TWELVE_STEPS  # the steps of the shared one-process reference (conftest.twelve_steps)
DDP = ["--accelerate-config", str(CONFIGS / "accelerate" / "cpu_ddp.yaml"), "--num-processes", "2"]


def _ports(launch: list[str]) -> list[str]:
    from test_distributed import free_port

    return [*launch, "--main-process-port", str(free_port())] if launch else []


def _start(out: Path, *extra: str, env: dict | None = None, own_group: bool = False, stderr=subprocess.PIPE) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launcher", "train", str(TINY), "--output-dir", str(out), "--run-name", "r",
           *FAST, *STEPS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **OFFLINE_ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=own_group)


def _once_stalling(proc: subprocess.Popen, errors: Path) -> None:
    """Waits until rank 0 sleeps inside a step (LAUNCHER_STALL), its stderr in `errors`. Up to
    10 minutes: in CI a 2-rank run beside another worker's 2-rank SmolLM2 runs on 2 cores once
    took over 300 s to get there, its stderr still empty (alone: 45 s). A run that dies, or
    never gets there, fails with its stderr and its ranks' progress records."""
    deadline = time.time() + 600
    while "LAUNCHER_STALL: rank 0 sleeps" not in errors.read_text():
        if proc.poll() is not None or time.time() > deadline:
            progress = {p.name: p.read_text() for p in errors.parent.glob("**/ranks/*.progress")}
            raise AssertionError(f"exit {proc.poll()}; progress {progress}; stderr:\n{errors.read_text()[-3000:]}")
        time.sleep(0.05)


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


def _same(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(twelve_steps):
    return _weights(twelve_steps[1])


def _steps_logged(out: Path) -> list[int]:
    client = mlflow_client(out)
    (run,) = all_runs(client)  # one MLflow run across the attempts
    assert run.info.status == "FINISHED"
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))


@pytest.mark.parametrize("launch", [pytest.param([], id="one-process"),
                                    pytest.param(DDP, id="two-ranks", marks=pytest.mark.distributed)])
def test_ctrl_c_checkpoints_at_the_step_end_and_the_same_command_resumes_exactly(launch, tmp_path, reference):
    run, launch = tmp_path / "r", _ports(launch)
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:
        proc = _start(tmp_path, *launch, env={"LAUNCHER_STALL": "0:3:4"}, stderr=sink)  # rank 0 takes 4 s more in step 3
    _once_stalling(proc, errors)  # training: a stop asked before the first step is another test's
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    err = errors.read_text()
    assert proc.returncode == 0 and "Traceback" not in err and "SignalException" not in err, (out[-3000:], err[-3000:])
    said = [x for x in err.splitlines() if x.startswith("launcher: SIGINT")]
    assert said == ["launcher: SIGINT: every rank checkpoints at the end of the step in progress and exits; if they "
                    "are killed before that" + (" within 600 s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)" if launch else "")
                    + ", the resume goes back to step 0: no checkpoint is sealed yet; Ctrl-C again exits at once"], err[-3000:]
    stopped = [x for x in out.splitlines() if x.startswith("stopped at step")]
    assert len(stopped) == 1 and stopped[0].endswith("(SIGINT); checkpoint saved; run the same command again to resume"), out
    step = int(stopped[0].split()[3])
    assert 1 <= step < 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{step:06d}"]
    assert (run / "checkpoints" / f"step-{step:06d}" / "COMPLETE").is_file() and not (run / "model").exists()

    again = check(launcher("train", str(TINY), *launch, "--output-dir", str(tmp_path), "--run-name", "r", *FAST, *STEPS))
    assert f"resuming from {run / 'checkpoints' / f'step-{step:06d}'}" in again.stdout
    assert _same(_weights(run), reference) < 1e-5
    assert _steps_logged(tmp_path) == list(range(1, 13))


@pytest.mark.parametrize("launch", [pytest.param([], id="one-process"),
                                    pytest.param(DDP, id="two-ranks", marks=pytest.mark.distributed)])
def test_a_second_ctrl_c_exits_at_once_and_the_same_command_starts_again_in_place(launch, tmp_path, reference):
    """Rank 0 stalls an hour in step 1; two Ctrl-C a second apart end the run at once, with
    exit 130, one line and no traceback. No checkpoint was sealed, so the run directory is
    marked, and the same command starts again from step 0 in it, in the same MLflow run."""
    run, launch = tmp_path / "r", _ports(launch)
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:
        proc = _start(tmp_path, *launch, env={"LAUNCHER_STALL": "0:1:3600"}, stderr=sink)
    _once_stalling(proc, errors)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 120  # the first press has been taken (its line said), then a second one
    while "launcher: SIGINT: every rank" not in errors.read_text():
        assert proc.poll() is None and time.time() < deadline, errors.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(1.0)  # more than runtime.SAME_KEY_PRESS_S: a second press, not the same one twice
    proc.send_signal(signal.SIGINT)
    out, _ = communicate_or_kill(proc, 120)  # the stall lasts an hour: an exit at all is "at once"
    err = errors.read_text()
    assert proc.returncode == 130, (proc.returncode, out[-3000:], err[-3000:])
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    said = [x for x in err.splitlines() if x.startswith("launcher: SIGINT again")]
    assert said == ["launcher: SIGINT again: exiting now, without a checkpoint; the same command resumes from step 0: "
                    "no checkpoint is sealed yet"], err[-3000:]
    assert not any(x.startswith("stopped at step") for x in out.splitlines())
    assert not list((run / "checkpoints").glob("step-*"))
    assert (run / ".interrupted").is_file()
    if not launch:  # another config under its name is refused: it would continue this MLflow run from scratch
        other = launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *FAST, *STEPS, "train.lr=0.01")
        assert other.returncode == 2 and other.stderr.strip().splitlines() == [
            f"error: run directory {run} holds no complete checkpoint: its last attempt was interrupted (Ctrl-C) before "
            "its first checkpoint, with another config (train.lr: 0.001 -> 0.01); pick another --run-name, or remove it "
            "to start this config there"], other.stderr[-3000:]

    again = check(launcher("train", str(TINY), *launch, "--output-dir", str(tmp_path), "--run-name", "r", *FAST, *STEPS))
    assert "restarting from step 0 in place: the last attempt was interrupted (Ctrl-C) before its first checkpoint" \
        in again.stdout
    assert not (run / ".interrupted").exists()
    assert _same(_weights(run), reference) < 1e-5
    assert _steps_logged(tmp_path) == list(range(1, 13))
    records = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert records == list(range(1, 13))


@pytest.mark.parametrize("launch", [pytest.param([], id="one-process"),
                                    pytest.param(DDP, id="two-ranks", marks=pytest.mark.distributed)])
def test_a_stop_asked_before_the_first_step_ends_the_run_there_and_the_same_command_starts_again(launch, tmp_path,
                                                                                                 reference):
    """A stop asked during start-up (here slurm/train.sh's stop file, which a warning that came
    while the model loaded creates; a SIGTERM or a Ctrl-C then is the same flag) ran the step-0
    evaluation and a first step before its checkpoint: time that a preemption's grace is not
    sized for (an SFT evaluation generates). Now the run stops before both: exit 0 with the
    stop acknowledged (slurm/train.sh requeues it), no checkpoint, the run directory marked;
    the same command starts again from step 0 in place, in the same MLflow run, to the weights
    of an uninterrupted run."""
    run, launch = tmp_path / "r", _ports(launch)
    stop_file = tmp_path / "stop"
    stop_file.touch()
    args = ["train", str(TINY), *launch, "--output-dir", str(tmp_path), "--run-name", "r", *FAST, *STEPS]
    first = launcher(*args, env={"LAUNCHER_STOP_FILE": str(stop_file)})
    assert first.returncode == 0 and "Traceback" not in first.stderr, (first.stdout[-3000:], first.stderr[-3000:])
    why = f"stop file {stop_file}"
    assert [x for x in first.stdout.splitlines() if x.startswith("stopped")] == [
        f"stopped before the first step ({why}); nothing is trained yet, so there is no checkpoint; the same command "
        "starts the run again from step 0 in place"], first.stdout[-3000:]
    assert not any(x.startswith(("step 0 eval", "first optimizer step")) for x in first.stdout.splitlines())
    assert (run / "metrics.jsonl").read_text() == ""
    assert not list((run / "checkpoints").glob("step-*")) and not (run / "model").exists()
    # what slurm/train.sh requeues on (not when its own timer asked this early)
    assert (tmp_path / "stop.stopped").read_text() == f"{why} before the first step\n"
    (mlrun,) = all_runs(mlflow_client(tmp_path))
    assert mlrun.info.status == "KILLED"
    other = launcher(*args, "train.lr=0.01")  # only the same run starts again there, in its MLflow run
    # (on 2 ranks the ranks find it: the launch exits 2 after rank 0's line, without torchrun's report)
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        f"error: run directory {run} holds no complete checkpoint: its last attempt stopped before its first step "
        f"({why}), with another config (train.lr: 0.001 -> 0.01); pick another --run-name, or remove it to start this "
        "config there"], other.stderr[-3000:]
    assert (run / ".interrupted").is_file()

    again = check(launcher(*args))
    assert f"restarting from step 0 in place: the last attempt stopped before its first step ({why})" in again.stdout
    assert not (run / ".interrupted").exists()
    assert _same(_weights(run), reference) < 1e-5
    assert _steps_logged(tmp_path) == list(range(1, 13))
    (mlrun,) = all_runs(mlflow_client(tmp_path))
    assert mlrun.data.tags["launcher.attempts"] == "2"


def _loader_workers(pid: int) -> list[int]:
    """pid's data loader workers that already ignore SIGTERM (torch names a worker
    pt_data_worker before its worker_init_fn runs: a signal in between would kill it)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if _worker_alive(int(c)) and _ignores_sigterm(int(c))]


def _worker_alive(pid: int) -> bool:
    """Whether pid is a live (not zombie) data loader worker; /proc/PID/stat reads
    `pid (comm) state ...`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    name, rest = stat.split("(", 1)[1].rsplit(")", 1)
    return name == "pt_data_worker" and rest.split()[0] != "Z"


def _ignores_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    ignored = next(int(x.split()[1], 16) for x in status.splitlines() if x.startswith("SigIgn:"))
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


def test_sigterm_to_the_whole_process_group_checkpoints_and_resumes_exactly(tmp_path, reference):
    """Slurm's preemption and `kill -TERM -PGID` signal every process of the job, the data
    loader's worker too (data.num_workers: 1, the default). The worker leaves the stop to the
    training process, which checkpoints at the end of the step in progress and exits cleanly
    (a worker killed under it would raise mid-step, with a traceback and no checkpoint); the
    worker ends with it, and the same command resumes to the uninterrupted run's weights."""
    run = tmp_path / "r"
    stop_file = tmp_path / "stop"  # as slurm/train.sh names one: the run says beside it why it stopped
    proc = _start(tmp_path, "data.num_workers=1", env={"LAUNCHER_STALL": "0:3:4", "LAUNCHER_STOP_FILE": str(stop_file)},
                  own_group=True)
    try:
        deadline = time.time() + 300
        while not (workers := _loader_workers(proc.pid)):  # training has started: its loader's worker is up
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "Traceback" not in err, (out[-3000:], err[-3000:])
        stopped = [x for x in out.splitlines() if x.startswith("stopped at step")]
        assert len(stopped) == 1 and stopped[0].endswith("(SIGTERM); checkpoint saved; run the same command again to resume"), out
        step = int(stopped[0].split()[3])
        assert 1 <= step < 6  # the step the signal lands in depends on timing; the equalities below do not
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{step:06d}"]
        assert (run / "checkpoints" / f"step-{step:06d}" / "COMPLETE").is_file() and not (run / "model").exists()
        assert (tmp_path / "stop.stopped").read_text() == "SIGTERM\n"  # what slurm/train.sh's requeue line names
        deadline = time.time() + 30
        while any(_worker_alive(w) for w in workers):  # the worker ended too, none is left behind
            assert time.time() < deadline, workers
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of the group outlives a failed test

    again = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "r", *FAST, *STEPS))
    assert f"resuming from {run / 'checkpoints' / f'step-{step:06d}'}" in again.stdout
    assert _same(_weights(run), reference) < 1e-5
    assert _steps_logged(tmp_path) == list(range(1, 13))


@pytest.mark.parametrize("launch, sig, to_every_process", [("one", "SIGTERM", False), ("ddp", "SIGTERM", False),
                                                          ("ddp", "SIGUSR1", True)])
def test_a_signal_to_an_accelerate_launch_gives_the_ranks_their_grace_and_exits_as_they_did(tmp_path, launch, sig,
                                                                                           to_every_process):
    """A one-process accelerate config does not go through torchrun: accelerate's simple
    launcher SIGKILLed its process 5 s after a SIGTERM, so a step plus checkpoint longer than
    that was lost (no checkpoint, exit -9). Now the SIGTERM is forwarded and the process has
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT: here it ends an 8 s step, checkpoints and exits cleanly.
    On two ranks torchrun forwarded it, and the launch exited 143 after ranks that had
    checkpointed and exited 0 (accelerate's 128 + N), which slurm/train.sh does not requeue.
    SIGUSR1 to every process (a user's own srun of `launcher train --accelerate-config`, the
    command `launcher plan` prints, and `scancel --signal=USR1 JOB` or `--signal=USR1@600`):
    its default action ended the launch (exit -10), and torchrun's ranks with it, mid-step;
    now the launch ignores it and the ranks checkpoint."""
    import psutil

    run = tmp_path / "r"
    errors = tmp_path / "stderr.txt"
    flags = ["--accelerate-config", str(CONFIGS / "accelerate" / "cpu.yaml")] if launch == "one" else _ports(DDP)
    with open(errors, "w") as sink:
        proc = _start(tmp_path, *flags, env={"LAUNCHER_STALL": "0:2:8"}, stderr=sink)
    _once_stalling(proc, errors)  # inside step 2 for 8 s
    # to the launch only, as `kill PID` or a container stop sends it; or to every process of it
    for p in [psutil.Process(proc.pid), *(psutil.Process(proc.pid).children(recursive=True) if to_every_process else [])]:
        with contextlib.suppress(psutil.Error):
            p.send_signal(getattr(signal, sig))
    out, _ = communicate_or_kill(proc, 300)
    err = errors.read_text()
    assert proc.returncode == 0 and "Traceback" not in err, (proc.returncode, out[-3000:], err[-3000:])
    stopped = [x for x in out.splitlines() if x.startswith("stopped at step")]
    assert stopped == [f"stopped at step 2 ({sig}); checkpoint saved; run the same command again to resume"], out[-3000:]
    assert (run / "checkpoints" / "step-000002" / "COMPLETE").is_file()


def test_ranks_that_outlive_the_grace_after_a_sigterm_are_killed_by_the_launch(tmp_path):
    """The launch forwards a SIGTERM itself (torchrun's handling exited 143 after a clean stop),
    so it also keeps torchrun's promise: ranks still running TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    seconds later are SIGKILLed, and the launch fails. Rank 0 stalls an hour inside step 2."""
    import psutil

    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as sink:
        proc = _start(tmp_path, *_ports(DDP), env={"LAUNCHER_STALL": "0:2:3600", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"},
                      stderr=sink)
    _once_stalling(proc, errors)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    out, _ = communicate_or_kill(proc, 120)  # without the kill: an hour
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, out[-2000:], errors.read_text()[-3000:])
    assert ("launcher: the ranks were still running 5 s after the SIGTERM (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and were "
            "killed") in errors.read_text().splitlines()
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not any(line.startswith("stopped at step") for line in out.splitlines())


def test_a_sigterm_while_accelerate_runs_a_helper_before_the_ranks_still_reaches_them(tmp_path):
    """accelerate runs nvidia-smi just before torchrun starts the ranks. A SIGTERM then went to
    nvidia-smi only: the ranks, started after it, trained on unaware until the grace ran out and
    were SIGKILLed (600 s under slurm/train.sh, no checkpoint; this short run even finished).
    Now children started after the signal get it too, and the launch ends at once."""
    import psutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nsleep 3\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}
    proc = _start(tmp_path, *_ports(DDP), env=env)
    deadline = time.time() + 300
    while not any(c.name() == "nvidia-smi" for c in psutil.Process(proc.pid).children()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = communicate_or_kill(proc, 120)  # the grace is 600 s: ended by the signal, not by the kill after it
    assert not (tmp_path / "r" / "model").exists()  # before: the ranks never heard of it and finished the run
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, (proc.returncode, err[-3000:])
    assert "launcher: the SIGTERM ended ranks that were starting, before they could stop at a step" in err.splitlines()


# A loader's worker raises in the training process, from train_batches: the error ends the
# process, with the worker stopped, not left to the interpreter's exit.
WORKER_ERROR = """
from launcher.data import batching

class Steps:  # what train_batches asks of a StepSampler: one micro-batch of one row per step
    accumulation = 1
    def step_microbatches(self, step):
        return [[step]]

def collate(rows):
    if rows[0]["input_ids"] == [3]:
        raise ValueError("a bad row in the worker")
    return rows

rows = [{"input_ids": [i]} for i in range(10)]
for step, _ in batching.train_batches(rows, Steps(), 0, 10, collate, num_workers=1, pin_memory=False):
    pass
"""


def test_an_error_in_a_loader_worker_ends_the_process_with_the_worker():
    """Workers ignore SIGTERM, so the interpreter's exit, which SIGTERMs daemon processes and
    waits for them, would hang on one still running: train_batches stops them itself on every
    way out (an error in the step: the fault-injected save in test_trust ends the same way)."""
    proc = subprocess.run([sys.executable, "-c", WORKER_ERROR], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "ValueError: a bad row in the worker" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_launch_waiting_for_a_machine_that_never_comes_stops_at_a_signal(tmp_path, sig):
    """Machine 0 of 2, the other never started: torchrun's rendezvous waits in C++ holding the
    main thread, and Ctrl-C and SIGTERM were both ignored until it timed out (many minutes;
    only kill -9 ended it). Now the launch ends within seconds, with one line and 128 + N, and
    leaves nothing (no rank had started)."""
    import socket

    from test_distributed import free_port

    port = free_port()
    proc = _start(tmp_path / "out", *DDP, "--nodes", "2", "--machine-rank", "0", "--main-process-ip", "127.0.0.1",
                  "--main-process-port", str(port))
    deadline = time.time() + 300
    while True:  # the rendezvous server is up: the launch is waiting in it for machine 1
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    start = time.time()
    out, err = communicate_or_kill(proc, 60)
    what = "interrupted (Ctrl-C)" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert (proc.returncode, err.strip().splitlines()[-1:]) == (
        128 + sig, [f"launcher: {what} while waiting for the other machines to join; no rank had started"]), (out, err)
    assert time.time() - start < 30 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
