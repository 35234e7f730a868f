"""Fail points for the fault-injection tests. With `LAUNCHER_FAILPOINT=WHERE`, global rank 0
stops itself (SIGSTOP) at that point, so a test can then SIGKILL the whole process tree
(`accelerate launch`, every rank) exactly there, as a lost node or `kill -9` would.
(Rank 0 cannot do it alone: torchrun starts each rank in its own session.) WHERE is one of

    started         `launcher train` noted what a new run would create, nothing checked yet
    load            the checkpoint the run starts from, about to be read (the run directory taken)
    step:N          after optimizer step N, before any checkpoint of that step
    checkpoint:N    inside the save of step N: every rank has written its part, nothing sealed
    export          inside the export: the weights are written, not yet renamed into place
    mlflow-store    a new SQLite MLflow store built beside its place, not yet linked there

`LAUNCHER_STALL=RANK:WHERE:SECONDS` makes that rank sleep, WHERE being a step number (inside
that optimizer step, after its backward passes: the hang the watchdog tests need),
`export` (rank 0 writing the final model while the others wait, whether it writes the live
weights or adopts the best evaluation's snapshot) or `eval` (each evaluation, before it runs). It says so on stderr, so a test knows the
stall happened.

`LAUNCHER_SAVE_ERROR=RANK:STEP[:disk]` makes that rank's save of that step fail (a RuntimeError, or
with `:disk` an OSError ENOSPC
before the engine writes), as an engine bug on one rank would, while the others go on
into the engine's collectives.

`LAUNCHER_HIDE_CHECKPOINT=RANK:STEP` makes that rank not see the sealed checkpoint of that step
the first time it looks (a shared file system whose cache has not caught up on that node).

The hooks act only in the test suite (LAUNCHER_TESTING=1, which tests/conftest.py sets): in
any other run a stray hook variable would stop or stall a rank, so it is ignored with one
warning line. Unset, each point costs one comparison.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

HOOKS = ("LAUNCHER_FAILPOINT", "LAUNCHER_STALL", "LAUNCHER_SAVE_ERROR", "LAUNCHER_HIDE_CHECKPOINT")


def _hooks() -> tuple[str | None, ...]:
    values = tuple(os.environ.get(name) for name in HOOKS)
    if os.environ.get("LAUNCHER_TESTING") == "1" or not any(values):
        return values
    if int(os.environ.get("RANK", "0")) == 0:
        named = ", ".join(name for name, value in zip(HOOKS, values) if value)
        print(f"warning: ignoring {named}: fault-injection hooks act only in the test suite (LAUNCHER_TESTING=1)",
              file=sys.stderr, flush=True)
    return (None,) * len(HOOKS)


_WHERE, _STALL, _SAVE_ERROR, _HIDE = _hooks()
_hidden_once: list[int] = []


def hidden(step: int) -> bool:
    """Whether this rank is to miss the checkpoint of `step` now (LAUNCHER_HIDE_CHECKPOINT: once)."""
    if _HIDE is None or _hidden_once or _HIDE != f"{os.environ.get('RANK', '0')}:{step}":
        return False
    _hidden_once.append(step)
    return True


def point(name: str, step: int | None = None) -> None:
    if _WHERE is None or _WHERE != (name if step is None else f"{name}:{step}"):
        return
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"failpoint {_WHERE}: rank 0 stopped, waiting to be killed", file=sys.stderr, flush=True)
    # To this thread: it stops the whole process, and this thread before its next line (sent to
    # the process, another thread may take it, and this one ran on a moment: seen in the MLflow
    # warm-up's thread).
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


def stall(where: int | str) -> None:
    if _STALL is None:
        return
    rank, at, seconds = _STALL.split(":")
    if int(rank) == int(os.environ.get("RANK", "0")) and at == str(where):
        import time

        print(f"LAUNCHER_STALL: rank {rank} sleeps {seconds} s at {where}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


def save_error(step: int) -> None:
    if _SAVE_ERROR is None:
        return
    rank = int(os.environ.get("RANK", "0"))
    if _SAVE_ERROR == f"{rank}:{step}":
        raise RuntimeError(f"injected save failure (LAUNCHER_SAVE_ERROR) on rank {rank} at step {step}")
    if _SAVE_ERROR == f"{rank}:{step}:disk":  # a full disk on that rank alone (a node's own scratch, a quota)
        import errno

        raise OSError(errno.ENOSPC, f"No space left on device (injected: LAUNCHER_SAVE_ERROR, rank {rank}, step {step})")
