"""Small files the launcher writes whole: job.json, config.yaml, the generations, a rank's
progress, a cache lock, final_metrics.json. One way to write them, so that none is ever
seen half-written.

`write_atomically` writes beside the file, under a name of its own, and renames over it:
a reader (a resume, a watchdog, `launcher eval`) sees the old file or the new one, never a
prefix. A kill -9, a full disk (ENOSPC) or a size limit mid-write leaves the old file as it
was; a plain `write_text` truncated it first, so the generations of every earlier
evaluation were lost with it. No fsync: these files survive a killed process, which is
what a preempted or requeued job meets (a checkpoint, which must also survive a lost node,
is synced by checkpoint.sync_tree).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def process_umask() -> int:
    try:  # (Linux 4.7+) read without setting it: os.umask would change it for every thread a moment
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Replacement:
    """A file to be replaced whole: its temporary is made now, beside the file (where a link
    leads: the link stays), under a name of its own, so two writers of one file (a lock's
    owner and its heartbeat thread) never share one. `commit` writes and renames it over the
    file, `discard` removes it; either way nothing is left but the old file or the new one.
    As write_text, a file's mode is kept; a new file gets the umask's (mkstemp's would be
    0600), or `mode` when given. Making it early tells a caller at once that the place takes
    no file (`launcher predict --output`, before every row is answered)."""

    def __init__(self, path: Path | str, mode: int | None = None):
        self.target = Path(os.path.realpath(path))
        self.mode = mode
        fd, name = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(name)

    def commit(self, text: str) -> None:
        try:
            mode = self.mode
            if mode is None:
                try:
                    mode = self.target.stat().st_mode & 0o7777
                except FileNotFoundError:
                    mode = 0o666 & ~process_umask()
            self.tmp.write_text(text)
            os.chmod(self.tmp, mode)
            os.replace(self.tmp, self.target)
        finally:
            self.discard()

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def write_atomically(path: Path, text: str, mode: int | None = None) -> None:
    """`path.write_text(text)`, but the file is replaced whole or not at all (see Replacement)."""
    Replacement(path, mode).commit(text)


def file_in_the_way(folder: Path | str) -> Path | None:
    """The file that keeps `folder` from being made: the folder itself, or its nearest existing
    ancestor, when that is not a directory (mkdir says NotADirectoryError or FileExistsError,
    with a traceback); None when it can be made."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe if probe.exists() and not probe.is_dir() else None
