"""Which checkpoints may be unpickled.

A checkpoint is code as much as data: resuming goes through `accelerate.load_state`, which
unpickles `random_states_*.pkl`, `optimizer.bin`, `scheduler.bin` and any registered object
with `weights_only=False`; DeepSpeed's `*_model_states.pt` / `*_optim_states.pt` and FSDP's
distributed-checkpoint `.metadata` are pickles too. Unpickling a file runs whatever it says.

So a checkpoint is loaded only when this user's launcher wrote it, or when the user says it
is trusted (`checkpoint.trust=true`, `launcher export --trust-checkpoint`):

- Sealing a checkpoint signs it: the COMPLETE marker holds an HMAC-SHA256, under a key
  private to this user (`~/.config/launcher/checkpoint.key`, 0600; LAUNCHER_KEY_FILE
  overrides; made on first use), of every file's relative path and size. One stat per file:
  no pass over the bytes of a multi-GB checkpoint.
- Loading checks it. A checkpoint from elsewhere (another user's, a download), or one whose
  files changed since, is refused in one line naming the pickles it would load.
- The run's own checkpoints, found by auto-resume in its run directory, are trusted as before,
  and a checkpoint holding no pickle that would be loaded (an export from model.safetensors)
  needs nothing.

The signature says who wrote the checkpoint, not that its bytes are intact: a file replaced by
one of the same size, by someone who can write to the user's own files, still passes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from launcher.errors import ConfigError

MARKER = "COMPLETE"
# File names that are pickles (loading them runs code), as the engines write them.
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".metadata")


def key_file() -> Path:
    if os.environ.get("LAUNCHER_KEY_FILE"):
        return Path(os.environ["LAUNCHER_KEY_FILE"])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "launcher" / "checkpoint.key"


def _key(create: bool) -> bytes | None:
    path = key_file()
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:  # another job made it a moment ago
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex())
    text = path.read_text().strip()
    return bytes.fromhex(text) if text else None


def _manifest(ckpt: Path) -> str:
    files = sorted((p.relative_to(ckpt).as_posix(), p.stat().st_size) for p in ckpt.rglob("*")
                   if p.is_file() and p.name != MARKER)
    return json.dumps(files)


def sign(ckpt: Path) -> str:
    """The COMPLETE marker's text for a checkpoint whose files are all written."""
    key = _key(create=True)
    digest = hmac.new(key, _manifest(ckpt).encode(), hashlib.sha256).hexdigest()
    return json.dumps({"signature": digest, "key": "hmac-sha256 of (path, size) under the user's checkpoint key"})


def signed_by_this_user(ckpt: Path) -> bool:
    try:
        recorded = json.loads((ckpt / MARKER).read_text() or "{}").get("signature")
    except (OSError, ValueError, AttributeError):
        return False
    key = _key(create=False)
    if not recorded or key is None:
        return False
    return hmac.compare_digest(recorded, hmac.new(key, _manifest(ckpt).encode(), hashlib.sha256).hexdigest())


def pickles(ckpt: Path, only: tuple[str, ...] = ()) -> list[str]:
    """The checkpoint's pickled files (those under `only`, when given), relative names."""
    found = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")
                   if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    return [f for f in found if not only or f.startswith(only)]


def require(ckpt: Path, trusted: bool, where: str, flag: str, only: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, to unpickle a checkpoint this user's launcher did not write."""
    if trusted or signed_by_this_user(ckpt):
        return
    risky = pickles(ckpt, only)
    if not risky:
        return
    shown = ", ".join(risky[:3]) + (f" and {len(risky) - 3} more" if len(risky) > 3 else "")
    raise ConfigError(f"{where}: {ckpt} was not written by your launcher (no signature of yours, or its files changed "
                      f"since), and loading it unpickles {shown}, which can run any code; {flag} if you trust where it "
                      "came from")
