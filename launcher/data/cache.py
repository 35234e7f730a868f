"""A directory of prepared data (token Arrow tables, tiny tokenizers) built once and shared.

An entry is `CACHE/<kind>-<key>/`, where the key hashes what decides its contents: the
source's fingerprint (path, size, mtime), the tokenizer and the config fields that change
tokens. It is built in a temporary directory and renamed into place, so an entry that
exists is complete.

Who builds: the first process to create `CACHE/<kind>-<key>.lock` (O_CREAT|O_EXCL). Only
local rank 0 of each node competes for it, so:
- a cache on a file system all nodes share is built by ONE process in the whole job;
- a node-local cache (e.g. /tmp or local SSD on every node) is built once on every node,
  by that node's local rank 0, each from the same source rows, to identical contents.
Every other process waits for the entry by polling the file system, never in a collective:
a tokenization longer than the process-group timeout (train.collective_timeout_s) cannot
time it out. The waiting ranks print which process builds and at which stage every 30 s.
A build that fails records its error in the lock file under the job's token, so waiting
ranks stop with the same message; a lock left by a dead process of an earlier job is taken
over (same host: its pid is gone; any host: it recorded a failure).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from launcher.errors import DataError, UserError

CACHE_VERSION = 2  # bump when the layout or the meaning of an entry changes


def key_of(parts: dict) -> str:
    text = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Cache:
    def __init__(self, root: str | Path, token: str, candidate: bool, say: Callable[[str], None] = print,
                 label: str = "this process", others_wait: bool = True, poll_s: float = 0.2,
                 report_every_s: float = 30.0):
        self.root = Path(root)
        self.others_wait = others_wait  # False in a one-process run: a failure then leaves no lock behind
        self.token, self.candidate, self.say, self.label = token, candidate, say, label
        self.poll_s, self.report_every_s = poll_s, report_every_s

    def get(self, kind: str, parts: dict, build: Callable[[Path, Callable[[str], None]], None]) -> tuple[Path, bool]:
        """(entry directory, built by this process). `build(tmp_dir, stage)` fills tmp_dir and
        may call stage("what it is doing") so that waiting ranks can report it."""
        name = f"{kind}-{key_of(parts)}"
        final, lock = self.root / name, self.root / f"{name}.lock"
        started, last_report = time.monotonic(), time.monotonic()
        while True:
            if final.is_dir():
                return final, False
            holder = self._read(lock)
            if holder is None:
                if self.candidate and self._take(lock, kind):
                    self._build(final, lock, parts, build)
                    return final, True
            elif holder.get("token") == self.token and holder.get("failed"):
                cls = DataError if holder.get("user_error") else RuntimeError
                raise cls(*holder["failed"]) if cls is DataError else cls(
                    f"{holder.get('who')} failed to build {final}: {holder['failed'][0]}")
            elif holder.get("token") != self.token and self.candidate and self._stale(holder):
                self._remove(lock)
                continue
            now = time.monotonic()
            if holder is not None and now - last_report >= self.report_every_s:
                last_report = now
                stale_hint = "" if holder.get("token") == self.token else \
                    f" (a lock from another job; delete {lock} if nothing is building it)"
                self.say(f"waiting {now - started:.0f} s for {holder.get('who')} to build {name}: "
                         f"{holder.get('stage', 'starting')}{stale_hint}")
            time.sleep(self.poll_s)

    # ---- the builder's side

    def _take(self, lock: Path, kind: str) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        self._holder = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                        "who": f"{self.label} (host {socket.gethostname()}, pid {os.getpid()})",
                        "since": time.time(), "stage": f"building {kind}"}
        with os.fdopen(fd, "w") as f:
            json.dump(self._holder, f)
        return True

    def _build(self, final: Path, lock: Path, parts: dict, build) -> None:
        for old in self.root.glob(f"{final.name}.tmp-*"):  # left by a killed builder; we hold the lock
            shutil.rmtree(old, ignore_errors=True)
        tmp = self.root / f"{final.name}.tmp-{os.getpid()}"

        def stage(text: str) -> None:
            self._holder["stage"] = text
            self._write(lock, self._holder)

        try:
            tmp.mkdir(parents=True)
            build(tmp, stage)
            (tmp / "launcher-key.json").write_text(json.dumps(parts, indent=1, sort_keys=True, default=str))
            os.replace(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            problems = list(e.problems) if isinstance(e, UserError) else [f"{type(e).__name__}: {e}"]
            if self.others_wait:
                self._write(lock, {**self._holder, "failed": problems, "user_error": isinstance(e, UserError)})
            else:
                self._remove(lock)
            raise
        self._remove(lock)

    # ---- lock file helpers

    @staticmethod
    def _read(lock: Path) -> dict | None:
        try:
            return json.loads(lock.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return {}  # being written: look again shortly

    @staticmethod
    def _write(lock: Path, data: dict) -> None:
        tmp = lock.with_name(f"{lock.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, lock)  # the lock path never stops existing

    @staticmethod
    def _remove(lock: Path) -> None:
        try:
            lock.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def _stale(holder: dict) -> bool:
        if not holder:
            return False
        if holder.get("failed"):
            return True
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0)))
