"""Hang triage: when a rank makes no progress for `train.hang_timeout_s`, every rank writes
its Python stacks to RUN/ranks/rank-N.stack and rank 0 says which ranks are behind, and
where each one is.

Each rank runs a watchdog thread. The training loop calls `beat(step)` at every step end,
at every evaluation batch (`beating`) and around checkpoints; checkpoints and exports are
not watched (UNWATCHED: slow is not hung there). The thread writes RUN/ranks/rank-N.progress (step,
phase, wall time) at most once a second, so rank 0 can read every rank's progress from the
run directory without a collective, which a hung rank could never join. A rank that stops
beating dumps its stacks with faulthandler (all threads, the main one marked). A rank
waiting in a collective for the stalled one stops beating too, so it dumps as well, and
its stack shows the collective it waits in. Rank 0 waits a few seconds for the others'
files, then prints one report. The run is left alone: the collective timeout
(`train.collective_timeout_s`) decides whether it dies; a rank that moves again clears
the report, and a later stall reports again. A collective that times out raises in the
main thread: `dump_exception` writes that traceback to the same file.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import threading
import time
import traceback
from pathlib import Path

from launcher.files import write_atomically

# Phases that may be slow without being hung: rank 0 writes the final model or the best
# evaluation's snapshot (minutes for a big LoRA merge) while the others wait on the file
# system, in no collective; every rank writes its part of a checkpoint (many minutes at 70B
# on a slow file system). Their collectives (the gather before an export, the engine's
# and launcher's own during a save) are still bounded by train.collective_timeout_s.
UNWATCHED = {"export", "checkpoint"}


class Watchdog:
    def __init__(self, ranks_dir: Path, rank: int, world_size: int, timeout_s: float, say):
        self.dir, self.rank, self.world, self.timeout_s, self.say = ranks_dir, rank, world_size, timeout_s, say
        self.dir.mkdir(parents=True, exist_ok=True)
        # An earlier attempt's files (killed, then resumed or requeued) are not this one's: its
        # progress would stand in for a rank that never wrote one, and its stacks would end the
        # report's wait at once. Its stacks are kept aside (a post-mortem may want them).
        self.started = time.time()
        try:
            self.path(rank, "progress").unlink(missing_ok=True)
            if self.path(rank, "stack").is_file():
                os.replace(self.path(rank, "stack"), self.path(rank, "stack.previous"))
        except OSError:
            pass
        self.step, self.phase = 0, "start"
        self.last = time.monotonic()
        self.written = 0.0
        self.stalled = False
        self.stop = threading.Event()
        self.main_ident = threading.main_thread().ident
        self.thread = None
        if timeout_s > 0:
            self.thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
            self.thread.start()

    def path(self, rank: int, suffix: str) -> Path:
        return self.dir / f"rank-{rank:05d}.{suffix}"

    def beat(self, step: int, phase: str = "train") -> None:
        self.step, self.phase, self.last = step, phase, time.monotonic()

    def beating(self, loader, step: int, phase: str) -> "Beating":
        """`loader`, beating at every batch it yields: a long evaluation is progress."""
        return Beating(loader, self, step, phase)

    def close(self) -> None:
        self.stop.set()

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, kind, error, tb) -> None:
        """The run ends: an exception that is not the user's (a collective that timed out) is
        written beside the stacks first."""
        from launcher.errors import RunError, UserError

        if error is not None and not isinstance(error, (UserError, RunError, KeyboardInterrupt)):
            dump_exception(self.dir, self.rank, error)
        self.close()

    def _write_progress(self, stalled_for: float | None = None) -> None:
        record = {"rank": self.rank, "step": self.step, "phase": self.phase, "time": time.time(),
                  "stalled_for_s": stalled_for, "main_thread": f"0x{self.main_ident:016x}"}
        write_atomically(self.path(self.rank, "progress"), json.dumps(record))

    def _run(self) -> None:
        poll = min(max(self.timeout_s / 5, 0.2), 5.0)
        while not self.stop.wait(poll):
            idle = time.monotonic() - self.last
            try:
                if idle < self.timeout_s or self.phase in UNWATCHED:
                    if self.stalled:
                        self.stalled = False
                        if self.rank == 0:
                            self.say(f"hang watchdog: rank 0 is making progress again (step {self.step})")
                    if time.monotonic() - self.written >= 1.0:
                        self._write_progress()
                        self.written = time.monotonic()
                    continue
                if self.stalled:
                    continue
                self.stalled = True
                tmp = self.path(self.rank, "stack.tmp")  # renamed when whole: rank 0 may be reading
                with open(tmp, "w") as f:
                    f.write(f"rank {self.rank}: no progress for {idle:.0f} s at step {self.step} ({self.phase}); "
                            f"main thread 0x{self.main_ident:016x}\n")
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
                tmp.replace(self.path(self.rank, "stack"))
                self._write_progress(stalled_for=idle)
                if self.rank == 0:
                    self._report(idle)
            except OSError:  # a full or vanished run directory must not take the run down
                pass

    def _report(self, idle: float) -> None:
        deadline = time.monotonic() + min(10.0, self.timeout_s)
        while time.monotonic() < deadline and not all(self.path(r, "stack").is_file() for r in range(self.world)):
            time.sleep(0.2)
        progress = {}
        for r in range(self.world):
            try:
                progress[r] = json.loads(self.path(r, "progress").read_text())
            except (OSError, ValueError):
                progress[r] = None
            if progress[r] and progress[r].get("time", 0) < self.started - 5:  # (a rank not started in this attempt)
                progress[r] = None
        steps = [p["step"] for p in progress.values() if p]
        lowest = min(steps) if steps else None
        lines = [f"hang watchdog: no progress on rank 0 for {idle:.0f} s (train.hang_timeout_s={self.timeout_s:g}); "
                 f"stacks in {self.dir}/rank-N.stack"]
        for r in range(self.world):
            p = progress[r]
            if p is None:
                lines.append(f"  rank {r}: no progress file (never started, or its file system is unreachable)")
                continue
            behind = " BEHIND" if lowest is not None and p["step"] == lowest and len(set(steps)) > 1 else ""
            lines.append(f"  rank {r}: step {p['step']} ({p['phase']}){behind}, {where(self.path(r, 'stack'))}")
        self.say("\n".join(lines))


class Beating:
    """A data loader that beats its watchdog at every batch; otherwise the loader itself
    (len, dataset, ...)."""

    def __init__(self, loader, dog: Watchdog, step: int, phase: str):
        self.loader, self.dog, self.step, self.phase = loader, dog, step, phase

    def __iter__(self):
        for batch in self.loader:
            self.dog.beat(self.step, self.phase)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def dump_exception(ranks_dir: Path, rank: int, error: BaseException) -> None:
    """The traceback of an exception that ends the run (a collective timeout), beside the stacks."""
    try:
        with open(ranks_dir / f"rank-{rank:05d}.stack", "a") as f:
            f.write(f"rank {rank}: the run ended with an exception\n")
            f.write("".join(traceback.format_exception(error)))
    except OSError:
        pass


_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def where(stack_file: Path) -> str:
    """'at launcher/trainer.py:241 in train_step (innermost: .../distributed_c10d.py:2950 in all_reduce)'
    from a faulthandler dump: the main thread's innermost frame in our code, and its innermost."""
    try:
        text = stack_file.read_text()
    except OSError:
        return "no stack written"
    head = text.splitlines()[0] if text else ""
    main = re.search(r"main thread (0x[0-9a-f]+)", head)
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text)
    block = next((b for b in blocks[1:] if main and main.group(1) in b.splitlines()[0]), "")  # [0]: our header
    frames = _FRAME.findall(block)  # most recent call first
    if not frames:
        return "stack unreadable"
    ours = next((f for f in frames if f"{os.sep}launcher{os.sep}" in f[0] and "site-packages" not in f[0]), None)

    def fmt(f):
        path = f[0]
        short = path[path.rfind(f"{os.sep}launcher{os.sep}") + 1:] if ours and f is ours else Path(path).name
        return f"{short}:{f[1]} in {f[2]}"

    inner = frames[0]
    if ours is None or ours == inner:
        return f"at {fmt(inner)}"
    return f"at {fmt(ours)} (innermost: {fmt(inner)})"
