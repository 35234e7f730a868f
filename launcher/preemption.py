"""What a stop request costs: how long launcher has after a SIGTERM, and how far back a
resume goes if that is not long enough.

A SIGTERM (a scheduler's preemption, `kill`) or SIGUSR1 asks every rank to checkpoint at the
end of the step in progress and exit (runtime.watch_signals). Whoever sent it kills the ranks some time later:

- torchrun, the engine under `accelerate launch`, forwards SIGTERM to the ranks and SIGKILLs
  them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (torch's default: 30); launcher's own
  launch (launcher/launch.py, under `launcher train --accelerate-config` and slurm/train.sh)
  does the same itself. Those two raise it (GRACE_DEFAULT_S, SIGNAL_LEAD_S) unless it is
  set, so that the scheduler's own grace decides; a direct `accelerate launch` keeps 30 s
  unless the variable is exported.
- Slurm preemption SIGTERMs the job and SIGKILLs it after the partition's GraceTime; a time
  limit, after KillWait (slurm/train.sh stops the ranks SIGNAL_LEAD_S earlier through the stop
  file instead). A SIGTERM that also reaches srun makes srun SIGKILL the ranks at once, so
  under srun the stop file is the grace that counts (slurm/train.sh's header).

So the step in progress plus one checkpoint must fit in that grace. This module measures both
in the run and warns once when they do not fit, and on the signal rank 0 says at once how far
back the resume goes if the ranks are killed before their checkpoint is sealed.
"""

from __future__ import annotations

import os
import signal
import sys

# The signals that ask a run to stop at the end of the step (runtime.watch_signals); loader
# workers ignore them (data.batching), leaving the stop to the training process.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # read by torch.distributed.launcher.api.LaunchConfig
TORCH_DEFAULT_S = 30
GRACE_DEFAULT_S = 600  # what launcher's own launch paths give torchrun unless ENV is set
# `launcher plan` has no disk to time: it assumes this write rate per node (a fair NVMe or
# parallel file system figure) and says so; the run measures the real one and warns.
PLAN_WRITE_BYTES_PER_S = 1e9


def grace_s() -> int | None:
    """Seconds torchrun waits after forwarding a SIGTERM before it SIGKILLs the ranks; None when
    this process was not started by torchrun (then only the sender of the signal knows)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        return int(os.environ.get(ENV, TORCH_DEFAULT_S))
    except ValueError:
        return TORCH_DEFAULT_S


def watch_arrivals(on_arrival, name: str) -> bool:
    """Calls on_arrival(numbers: bytes) from a thread of its own as signals arrive, even while
    the main thread waits in C++ (a collective, torchrun's rendezvous), where Python's handlers
    run only once that call returns, and then once for every arrival of a signal number (a
    pending signal is one flag). Python's C-level handler writes each handled signal's number
    to the wakeup socket as it arrives; the thread reads them. One per process (the wakeup fd
    is); False where it cannot be set up (not the main thread)."""
    import socket
    import threading

    try:
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        return False

    def watch() -> None:
        _ = writer  # held for the life of the process: collected, it closed and the reads saw an end
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            on_arrival(data)

    threading.Thread(target=watch, name=name, daemon=True).start()
    return True


BEFORE_FIRST_STEP = "before the first step"  # in STOP_FILE.stopped: slurm/train.sh reads it


def acknowledge(why: str) -> None:
    """Beside LAUNCHER_STOP_FILE, say the run stopped before its end to a stop request, and
    which (a signal's name, "stop file ...", or "a signal to another rank"): slurm/train.sh
    requeues the job only then (a warning that came during the final evaluation or export,
    after the last step, requeued a finished run) and names it."""
    stop_file = os.environ.get("LAUNCHER_STOP_FILE")
    if stop_file:
        try:
            with open(stop_file + ".stopped", "w") as f:
                f.write(why + "\n")
        except OSError:
            pass


def launch_env(env: dict) -> dict:
    """The environment for a launch launcher starts itself: the grace raised unless set."""
    return env if env.get(ENV) else {**env, ENV: str(GRACE_DEFAULT_S)}


def plan_line(checkpoint_bytes: float, nodes: int) -> str:
    """`launcher plan`: the grace after a SIGTERM against the checkpoint's estimated write time."""
    try:
        grace = int(os.environ.get(ENV) or GRACE_DEFAULT_S)
    except ValueError:
        grace = GRACE_DEFAULT_S
    write_s = checkpoint_bytes / (PLAN_WRITE_BYTES_PER_S * max(nodes, 1))
    line = (f"preemption after a SIGTERM the ranks have {grace} s to end the step in progress and write a checkpoint "
            f"(~{write_s:,.0f} s at {PLAN_WRITE_BYTES_PER_S / 1e9:.0f} GB/s per node, assumed); {ENV} sets it: "
            f"launcher train and slurm/train.sh make it {GRACE_DEFAULT_S} unless set, a bare accelerate launch leaves torch's "
            f"{TORCH_DEFAULT_S} unless exported")
    if write_s >= grace:
        line += (f"\nwarning    the checkpoint alone takes longer than the grace: a preempted run resumes from the "
                 f"checkpoint before; raise {ENV} and the scheduler's grace")
    return line


class Preemption:
    """Per rank: the last sealed checkpoint, the measured step and checkpoint times."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.grace = grace_s()
        self.saved_step: int | None = None
        self.step_s: float | None = None
        self.save_s: float | None = None
        self.warned = False
        self.run_dir = None  # set once the run directory is taken: a second Ctrl-C marks it

    def back_to(self) -> str:
        return (f"step {self.saved_step} (checkpoints/step-{self.saved_step:06d})" if self.saved_step
                else "step 0: no checkpoint is sealed yet")

    def stepped(self, seconds: float) -> None:
        self.step_s = seconds

    def saved(self, step: int, seconds: float | None = None) -> None:
        """A checkpoint of `step` is sealed (written now in `seconds`, or loaded to resume)."""
        self.saved_step = max(step, self.saved_step or 0)
        if seconds is None:
            return
        self.save_s = max(seconds, self.save_s or 0.0)
        if self.grace is not None and self.step_s is not None and not self.warned and self.is_main \
                and self.step_s + self.save_s > self.grace:
            self.warned = True
            print(f"warning: one step ({self.step_s:.0f} s) plus a checkpoint ({self.save_s:.0f} s) take longer than "
                  f"the {self.grace} s torchrun waits after a SIGTERM ({ENV}): a preempted run is killed before its "
                  "checkpoint and resumes from the previous one; raise it (and the scheduler's grace) or save "
                  "less", file=sys.stderr, flush=True)

    def on_signal(self, name: str) -> None:
        """Called from the signal handler, once: one line, written without Python's buffered
        streams (the handler may have interrupted a print)."""
        if not self.is_main:
            return
        within = f" within {self.grace} s ({ENV})" if self.grace is not None else ""
        line = (f"launcher: {name}: every rank checkpoints at the end of the step in progress and exits; "
                f"if they are killed before that{within}, the resume goes back to {self.back_to()}")
        if name == "SIGINT":
            line += "; Ctrl-C again exits at once"
        _say(line)

    def exit_now(self, name: str) -> None:
        """A second Ctrl-C, from the signal handler: exit at once, no traceback. Before the first
        checkpoint, rank 0 marks the run directory, so the same command starts it again in place
        (checkpoint.resolve_resume) instead of refusing a directory with nothing to resume."""
        if self.is_main:
            if self.run_dir is not None and self.saved_step is None:
                mark_interrupted(self.run_dir, "")
            _say(f"launcher: {name} again: exiting now, without a checkpoint; the same command resumes from "
                 f"{self.back_to()}")
        os._exit(130)


INTERRUPTED = ".interrupted"  # in a run directory: stopped before its first checkpoint (and how, or nothing: Ctrl-C twice)


def mark_interrupted(run_dir, how: str) -> None:
    """RUN/INTERRUPTED: the same command starts the run again from step 0 in place
    (checkpoint.resolve_resume); `how` is what the restart's line says of the last attempt
    (empty: a second Ctrl-C). os-level writes: a signal handler calls it too."""
    try:
        fd = os.open(os.path.join(run_dir, INTERRUPTED), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, how.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def _say(line: str) -> None:
    """One line on stderr without Python's buffered streams (a signal handler may have
    interrupted a print)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass
