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
ranks stop with the same message.

No wait is unbounded. The builder rewrites its lock every `heartbeat_s` (a beat counter, and
the stage). A lock left by an earlier job is taken over, with one line naming it, when its
process is gone (same host), when it recorded a failure, or when it has not changed for
`stale_after_s` by the waiter's own clock (any host: a builder killed on another node, or a
lock planted there). A lock of this job that stops beating (its builder hung) stops the
waiting ranks with one line instead of a wait forever.

Trust (a cache is often put in /tmp on a multi-user node): the root is created private to
the user (0700) and refused when another user owns it or anyone may write to it, unless it
is declared shared with a group (data.cache_shared: created 2770, group members accepted).
Every entry records what it holds and who built it (launcher-key.json), and is checked
against its name before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

from launcher import owner
from launcher.errors import ConfigError, DataError, RunError, UserError
from launcher.files import write_atomically

CACHE_VERSION = 7  # bump when the layout or the meaning of an entry changes (3: builder recorded; 4: an
# answer's labels start over its template's spaces, untrained_turns counted; 5: a conversation cut
# before its last answer keeps the reference of the answer the cut leaves; 6: a scored row's
# question is the one its answer replies to; 7: rows holding special tokens' text counted)


def key_of(parts: dict) -> str:
    text = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _key_text(parts: dict) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def check_root(root: Path, shared: bool = False) -> None:
    """Create the cache root private to this user (2770 for a group-shared cache), or refuse,
    in one line, a root that strangers could fill: another user's (unless shared), or one
    anyone may write to."""
    where = "data.cache_dir"
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            root.mkdir(mode=0o2770 if shared else 0o700)
        except FileExistsError:  # another rank made it first
            pass
        else:
            os.chmod(root, 0o2770 if shared else 0o700)  # mkdir's mode passes through the umask
    st = root.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{where}: {root} is not a directory")
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {root} cannot be read and written by you (mode {stat.S_IMODE(st.st_mode):o}); "
                          "use a directory of your own")
    if st.st_mode & stat.S_IWOTH:
        raise ConfigError(f"{where}: {root} may be written by anyone (mode {stat.S_IMODE(st.st_mode):o}): another user "
                          f"could plant entries or locks in it; use a directory of your own, or chmod o-w it")
    if st.st_uid != os.getuid() and not (shared and st.st_gid in os.getgroups() + [os.getgid()]):
        raise ConfigError(f"{where}: {root} belongs to another user (uid {st.st_uid}); use a directory of your own, "
                          f"or set data.cache_shared=true for a cache your group shares (group-owned, not world-writable)")


class Cache:
    def __init__(self, root: str | Path, token: str, candidate: bool, say: Callable[[str], None] = print,
                 label: str = "this process", others_wait: bool = True, poll_s: float = 0.2,
                 report_every_s: float = 30.0, heartbeat_s: float = 10.0, stale_after_s: float = 120.0,
                 shared: bool = False):
        self.root = Path(root)
        self.others_wait = others_wait  # False in a one-process run: a failure then leaves no lock behind
        self.token, self.candidate, self.say, self.label = token, candidate, say, label
        self.poll_s, self.report_every_s = poll_s, report_every_s
        self.heartbeat_s, self.stale_after_s, self.shared = heartbeat_s, stale_after_s, shared
        check_root(self.root, shared)

    def get(self, kind: str, parts: dict, build: Callable[[Path, Callable[[str], None]], None]) -> tuple[Path, bool]:
        """(entry directory, built by this process). `build(tmp_dir, stage)` fills tmp_dir and
        may call stage("what it is doing") so that waiting ranks can report it."""
        name = f"{kind}-{key_of(parts)}"
        final, lock = self.root / name, self.root / f"{name}.lock"
        started, last_report = time.monotonic(), time.monotonic()
        seen, seen_since = None, time.monotonic()  # the lock's last content, and since when (our clock)
        while True:
            if final.is_dir():
                self._check_entry(final, parts)
                return final, False
            text = self._read_text(lock)
            if text != seen:
                seen, seen_since = text, time.monotonic()
            holder = self._parse(text)
            silent = holder is not None and time.monotonic() - seen_since >= self.stale_after_s
            if holder is None:
                if self.candidate and self._take(lock, kind):
                    if final.is_dir():  # built, and its lock removed, between our two looks above
                        self._remove(lock)
                        continue
                    self._build(final, lock, parts, build)
                    return final, True
            elif holder.get("token") == self.token and holder.get("failed"):
                cls = DataError if holder.get("user_error") else RuntimeError
                raise cls(*holder["failed"]) if cls is DataError else cls(
                    f"{holder.get('who')} failed to build {final}: {holder['failed'][0]}")
            elif holder.get("token") != self.token and self.candidate and (self._stale(holder) or silent):
                if self._take_over(lock, text):
                    why = "it recorded a failure" if holder.get("failed") else (
                        f"unchanged for {time.monotonic() - seen_since:.0f} s" if silent else "its process is gone")
                    self.say(f"taking over {lock.name}, left by {holder.get('who', 'an unknown process')} ({why})")
                continue
            elif holder.get("token") == self.token and silent:
                raise RunError(f"{holder.get('who')} building {final} has shown no sign of life for "
                                   f"{time.monotonic() - seen_since:.0f} s (its lock {lock} stopped beating)")
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
        if self.shared:
            os.fchmod(fd, 0o664)  # group members must read it (whatever the umask) to wait on it
        # The nonce tells this builder's lock from a successor's: a builder paused long enough
        # to be taken over must not overwrite or remove the new holder's lock.
        self._holder: dict[str, Any] = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                        "who": f"{self.label} (host {socket.gethostname()}, pid {os.getpid()})",
                        "since": time.time(), "stage": f"building {kind}", "nonce": secrets.token_hex(8)}
        with os.fdopen(fd, "w") as f:
            json.dump(self._holder, f)
        return True

    def _ours(self, lock: Path) -> bool:
        try:
            return (self._parse(self._read_text(lock)) or {}).get("nonce") == self._holder["nonce"]
        except (AttributeError, ConfigError):
            return False

    def _update(self, lock: Path) -> bool:
        """Rewrite our lock (stage, beat) if it is still ours; False once it was taken over."""
        if not self._ours(lock):
            return False
        self._write(lock, self._holder, self.shared)
        return True

    def _build(self, final: Path, lock: Path, parts: dict, build) -> None:
        stop = threading.Event()

        def beat() -> None:  # waiters read a lock that stops changing as a dead builder
            while not stop.wait(self.heartbeat_s):
                self._holder["beat"] = self._holder.get("beat", 0) + 1
                if not self._update(lock):
                    return

        beating = threading.Thread(target=beat, name="cache-heartbeat", daemon=True)
        beating.start()  # before anything slow, such as removing a killed builder's leftovers

        def stage(text: str) -> None:
            self._holder["stage"] = text
            self._update(lock)

        tmp = self.root / f"{final.name}.tmp-{os.getpid()}"
        try:
            for old in self.root.glob(f"{final.name}.tmp-*"):  # left by a killed builder; we hold the lock
                shutil.rmtree(old, ignore_errors=True)
            tmp.mkdir(parents=True)
            build(tmp, stage)
            built_by = {"user": _user(), "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
            (tmp / "launcher-key.json").write_text(json.dumps({"key": json.loads(_key_text(parts)), "built_by": built_by},
                                                              indent=1, sort_keys=True))
            if self.shared:  # readable by the group whatever the umask
                for path in [tmp, *tmp.rglob("*")]:
                    os.chmod(path, os.stat(path).st_mode | (0o050 if path.is_dir() else 0o040))
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # another builder won a take-over race: its entry is as good
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException as e:
            stop.set()
            beating.join()
            shutil.rmtree(tmp, ignore_errors=True)
            problems = list(e.problems) if isinstance(e, UserError) else [f"{type(e).__name__}: {e}"]
            if self._ours(lock):
                if self.others_wait:
                    self._write(lock, {**self._holder, "failed": problems, "user_error": isinstance(e, UserError)}, self.shared)
                else:
                    self._remove(lock)
            raise
        stop.set()
        beating.join()
        if self._ours(lock):
            self._remove(lock)

    def _check_entry(self, final: Path, parts: dict) -> None:
        """An entry is used only if it says it holds what its name says (and is ours, unless shared)."""
        try:
            recorded = json.loads((final / "launcher-key.json").read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        if recorded != json.loads(_key_text(parts)):
            raise ConfigError(f"data.cache_dir: {final} does not hold what its name says (its launcher-key.json "
                              f"is missing or differs); delete it and run again")
        if not self.shared and final.stat().st_uid != os.getuid():
            raise ConfigError(f"data.cache_dir: {final} was made by another user (uid {final.stat().st_uid}); "
                              f"delete it, or use a cache directory of your own")

    # ---- lock file helpers

    @staticmethod
    def _read_text(lock: Path) -> str | None:
        try:
            return lock.read_text()
        except FileNotFoundError:
            return None
        except PermissionError:  # never read as a silent lock (that would take over a live builder)
            raise ConfigError(f"data.cache_dir: cannot read {lock} (permission denied): a cache shared with a group needs "
                              "data.cache_shared=true in every job that uses it") from None
        except OSError:
            return ""

    @staticmethod
    def _parse(text: str | None) -> dict | None:
        if text is None:
            return None
        try:
            return json.loads(text or "{}")
        except json.JSONDecodeError:
            return {}  # being written: look again shortly

    def _take_over(self, lock: Path, seen: str | None) -> bool:
        """Remove a stale lock whose content is still `seen`. Moved aside first and checked, so
        that a waiter on another node that decided the same a moment earlier, and has made a
        fresh lock since, does not lose it: a lock that is not the one judged stale goes back."""
        aside = lock.with_name(f"{lock.name}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            return False
        if aside.read_text() != seen:
            try:
                os.link(aside, lock)  # put back, unless a newer lock is there already
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: put back unless one is there
                if not lock.exists():
                    os.replace(aside, lock)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    @staticmethod
    def _write(lock: Path, data: dict, shared: bool = False) -> None:
        write_atomically(lock, json.dumps(data), 0o664 if shared else None)  # the lock path never stops existing

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
        return holder.get("host") == socket.gethostname() and not owner.alive(int(holder.get("pid", 0)))
