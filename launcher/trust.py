"""Which checkpoints may be unpickled.

A checkpoint is code as much as data: resuming goes through `accelerate.load_state`, which
unpickles `random_states_*.pkl`, `optimizer.bin`, `scheduler.bin` and any registered object
with `weights_only=False`; DeepSpeed's `*_model_states.pt` / `*_optim_states.pt` and FSDP's
distributed-checkpoint `.metadata` are pickles too. Unpickling a file runs whatever it says.

So a checkpoint is loaded only when this user's launcher wrote it, or when the user says it
is trusted (`checkpoint.trust=true`, `launcher export --trust-checkpoint`):

- Sealing a checkpoint signs it: the COMPLETE marker holds an HMAC-SHA256, under a key
  private to this user (`~/.config/launcher/checkpoint.key`, 0600; LAUNCHER_KEY_FILE
  overrides; made on first use), of every file's relative path and size, and of the bytes
  of every pickle up to CONTENT_LIMIT (random states, scheduler, custom objects, DCP
  metadata, a LoRA run's optimizer): a stat per file and a few MB read, never a pass over a
  multi-GB optimizer state.
- Loading checks it. A checkpoint from elsewhere (another user's, a download), or one whose
  files changed since, is refused in one line naming the pickles it would load.
- The run's own checkpoints, found by auto-resume in its run directory, are trusted as before,
  and a checkpoint holding no pickle that would be loaded (an export from model.safetensors)
  needs nothing. The marker also lists every file's size (no key needed): a checkpoint a
  resume would load whose files were removed or changed size since (a bad copy) would fail
  half-way, so it is refused in one line that names the intact one before it, unless
  checkpoint.trust. Markers written before the listing (2026-12) are not checked.
- A key that cannot be made or read (a read-only home) never costs a checkpoint: the marker
  is written unsigned, with one warning; such checkpoints resume by path with checkpoint.trust.

- A checkpoint holding a symbolic link is neither signed-and-valid nor free of pickles: the
  listing does not enter a linked directory, but the engines' loaders follow it (an FSDP
  shard directory linked to pickles elsewhere passed as "no pickles"). Launcher writes none.

What it does not cover: a pickle larger than CONTENT_LIMIT (a full fine-tune's optimizer
state) swapped for another of the same size in a copy of a signed checkpoint still passes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import tempfile
from pathlib import Path

from launcher.errors import ConfigError

MARKER = "COMPLETE"
# File names that are pickles (loading them runs code), as the engines write them.
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".metadata")
CONTENT_LIMIT = 64 * 2**20  # pickles up to this size are signed by content, larger ones by size
_warned: list = []


def key_file() -> Path:
    if os.environ.get("LAUNCHER_KEY_FILE"):
        return Path(os.environ["LAUNCHER_KEY_FILE"])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "launcher" / "checkpoint.key"


def _key(create: bool) -> bytes | None:
    """The user's key; None when there is none (and create is False). Made atomically: a
    crash or a racing job never leaves an empty key behind. Raises OSError/ValueError when
    it cannot be made or read."""
    path = key_file()
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A name of its own (mkstemp, 0600): a PID's name, left by a write that failed (a full
        # disk), refused every later process of that PID (PIDs repeat in containers) a key.
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex())
            os.link(tmp, path)  # no clobber: a key another job made a moment ago wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < 16:
        raise ValueError(f"{path}: not a launcher key (delete it: a new one is made)")
    return key


def listed(items: list[str], sep: str = ", ") -> str:
    """The first three of `items` for a one-line message, and how many more there are."""
    return sep.join(items[:3]) + (f"{sep}and {len(items) - 3} more" if len(items) > 3 else "")


def _sizes(ckpt: Path) -> dict[str, int]:
    """Every file's size as sealed, by relative path (what `damaged` checks, with no key), in
    the sorted order the signature walks them."""
    return {p.relative_to(ckpt).as_posix(): p.stat().st_size
            for p in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MARKER)}


def _manifest(ckpt: Path, sizes: dict[str, int] | None = None) -> bytes:
    """What the signature covers: every file's path and size, and the bytes of small pickles."""
    digest = hashlib.sha256()
    for name, size in (_sizes(ckpt) if sizes is None else sizes).items():
        digest.update(json.dumps([name, size]).encode())
        if name.endswith(PICKLE_SUFFIXES) and size <= CONTENT_LIMIT:
            with open(ckpt / name, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.digest()


def sign(ckpt: Path) -> str:
    """The COMPLETE marker's text for a checkpoint whose files are all written. Never raises
    for want of a key: the checkpoint is worth more than its signature."""
    sizes = _sizes(ckpt)  # one walk serves the size list and the signature
    try:
        key = _key(create=True)
        if key is None:  # made on demand: cannot happen, but never sign with an empty key
            raise ValueError("no checkpoint key")
        signature = hmac.new(key, _manifest(ckpt, sizes), hashlib.sha256).hexdigest()
    except (OSError, ValueError) as e:
        if not _warned:
            _warned.append(e)
            print(f"warning: checkpoints are written unsigned ({key_file()}: {' '.join(str(e).split())[:200]}); "
                  "resuming one by path will need checkpoint.trust=true", file=sys.stderr, flush=True)
        return json.dumps({"signature": None, "files": sizes})
    return json.dumps({"signature": signature, "covers": "paths, sizes, small pickles' bytes; hmac-sha256, user key",
                       "files": sizes})


def damaged(ckpt: Path) -> list[str]:
    """The files of a sealed checkpoint that are gone or another size than when it was sealed
    (cut short by a bad copy, removed), as "NAME: what": loading would fail half-way. Files
    added since are not its business (a converter's output written inside). Empty for a
    checkpoint sealed before the marker listed its files. A stat per file, nothing read."""
    try:
        files = json.loads((ckpt / MARKER).read_text() or "{}").get("files")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(files, dict):
        return []
    found = []
    for name, size in files.items():
        try:
            now = (ckpt / name).stat().st_size
        except OSError:
            found.append(f"{name}: missing")
            continue
        if now != size:
            found.append(f"{name}: {now:,} bytes, sealed at {size:,}")
    return found


def links(ckpt: Path) -> list[str]:
    """Symbolic links inside the checkpoint, relative names (a linked directory is not entered)."""
    found = []
    for root, dirs, files in os.walk(ckpt):
        found += [(Path(root) / n).relative_to(ckpt).as_posix() for n in dirs + files if (Path(root) / n).is_symlink()]
    return sorted(found)


def signed_by_this_user(ckpt: Path) -> bool:
    """Whether this user's key signed the checkpoint's files as they are. The signature covers
    files, not where a symbolic link would lead: require refuses links before asking."""
    try:
        recorded = json.loads((ckpt / MARKER).read_text() or "{}").get("signature")
        key = _key(create=False)
        if not recorded or key is None:
            return False
        return hmac.compare_digest(recorded, hmac.new(key, _manifest(ckpt), hashlib.sha256).hexdigest())
    except (OSError, ValueError, AttributeError):  # unreadable, or files going away under us
        return False


def pickles(ckpt: Path, only: tuple[str, ...] = ()) -> list[str]:
    """The checkpoint's pickled files (those under `only`, when given), relative names."""
    found = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")
                   if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    return [f for f in found if not only or f.startswith(only)]


def require(ckpt: Path, trusted: bool, where: str, flag: str, only: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, to unpickle a checkpoint this user's launcher did not write."""
    if trusted:
        return
    if linked := links(ckpt):
        shown = listed(linked)
        raise ConfigError(f"{where}: {ckpt} holds symbolic links ({shown}), which no checkpoint of launcher holds: "
                          f"loading follows them to files outside it, pickles among them, which can run any code; "
                          f"{flag} if you trust where it came from")
    if signed_by_this_user(ckpt):
        return
    risky = pickles(ckpt, only)
    if not risky:
        return
    shown = listed(risky)
    try:
        unsigned = not json.loads((ckpt / MARKER).read_text() or "{}").get("signature")
    except (OSError, ValueError, AttributeError):
        unsigned = True
    why = ("its COMPLETE marker is unsigned: written by hand, by a launcher before signing, or without a key" if unsigned
           else "no signature of yours, or its files changed since")
    raise ConfigError(f"{where}: {ckpt} was not written by your launcher ({why}), and loading it unpickles {shown}, "
                      f"which can run any code; {flag} if you trust where it came from")
