"""A real full disk: the run directory on a small tmpfs (root only, like the Slurm tests).

- less room than one checkpoint: refused before training, exit 2, one line, nothing left;
- room for one checkpoint but not two: the second save fails midway with a real ENOSPC,
  the first checkpoint stays whole, one line says so (exit 1); with more room the same
  command resumes from it and ends with the weights of an uninterrupted run;
- a read-only file system: refused before anything is created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FAST, TINY, check, launcher

pytestmark = pytest.mark.slow

ARGS = [*FAST, "train.max_steps=8", "checkpoint.every_steps=4", "checkpoint.keep_last=1", "eval.every_steps=4",
        "tracking.mlflow=false"]


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size_bytes, read_only=False) -> a fresh tmpfs directory; unmounted at the end."""
    mounts = []

    def mount(size: int, read_only: bool = False, at: Path | None = None) -> Path:
        where = at or tmp_path / f"fs{len(mounts)}"
        where.mkdir(exist_ok=True)
        opts = f"{'remount,' if at else ''}size={max(size // 1024, 4)}k{',ro' if read_only else ''}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if proc.returncode:
            if os.geteuid() != 0:
                pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
            raise RuntimeError(f"mount failed: {proc.stderr}")
        if not at:
            mounts.append(where)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], check=False)


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def test_full_disk_before_and_during_a_save(tmp_path, tmpfs):
    cache = ["data.cache_dir=" + str(tmp_path / "cache")]
    ref = tmp_path / "ref"
    check(launcher("train", str(TINY), "--output-dir", str(ref), "--run-name", "r", *ARGS, *cache))
    run = ref / "r"
    ckpt = max(_du(p) for p in (run / "checkpoints").iterdir())  # one checkpoint
    # What the run writes before its second save, besides checkpoints: config, data, tokenizer
    # (and the step-4 evaluation's weights-only snapshot, RUN/best, which is kept at the end as
    # model/'s files: measured from model/, counted in the margins below).
    outputs = [run / n for n in ("checkpoints", "model", "best", "training.png", "final_metrics.json")]
    base = _du(run) - sum(_du(p) for p in outputs)
    assert ckpt > 3 * base > 0, (ckpt, base)  # the checkpoint dominates, so the sizes below are unambiguous

    # 1. Less room than one checkpoint: refused before the first step, nothing left behind.
    small = tmpfs(base + 2 * 4096 + ckpt // 4)
    proc = launcher("train", str(TINY), "--output-dir", str(small / "out"), "--run-name", "r", *ARGS, *cache)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: output_dir: a checkpoint of this run takes about"), proc.stderr
    assert "Traceback" not in proc.stderr and "first optimizer step" not in proc.stdout
    assert list(small.iterdir()) == []

    # 2. Room for one checkpoint, not two: the step-8 save runs out of space midway.
    fs = tmpfs(base + 3 * ckpt // 2)
    cmd = ["train", str(TINY), "--output-dir", str(fs / "out"), "--run-name", "r", *ARGS, *cache]
    proc = launcher(*cmd)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "checkpoint at step 8 not written" in lines[0]
    # ENOSPC as OSError (plain writes) or as torch.save's zip-writer RuntimeError, by which file fills the disk
    assert "No space left on device" in lines[0] or "out of disk space" in lines[0], lines[0]
    assert "step-000004, is intact" in lines[0]
    ckpts = fs / "out" / "r" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000004"]  # no temp dir, no half checkpoint
    assert (ckpts / "step-000004" / "COMPLETE").is_file()
    assert abs(_du(ckpts / "step-000004") - ckpt) < 4096  # whole: the size of a reference checkpoint
    assert not (fs / "out" / "r" / "model").exists()

    # 3. More room, the same command: resumes from step 4 and ends where the reference ended.
    tmpfs(base + 5 * ckpt, at=fs)
    proc = check(launcher(*cmd))
    assert "resuming from" in proc.stdout and "step-000004" in proc.stdout
    got, want = _weights(fs / "out" / "r"), _weights(run)
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k] - want[k]).abs().max().item() < 1e-6, k


def test_read_only_output_dir_is_refused_before_anything(tmp_path, tmpfs):
    ro = tmpfs(1 << 20, read_only=True)
    proc = launcher("train", str(TINY), "--output-dir", str(ro / "runs"), *FAST, "tracking.mlflow=false")
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "output_dir:" in lines[0] and "Read-only file system" in lines[0], proc.stderr
    assert list(ro.iterdir()) == []


@pytest.mark.distributed
def test_a_universal_conversion_without_the_room_for_it_is_one_line_before_it_starts(tmp_path, tmpfs):
    """ZeRO-2 shards of 1 rank resumed on 2 on a disk with room for the run's next checkpoint
    but not for DeepSpeed's conversion of them (more than twice the shards): rank 0 refuses in
    one line naming what it needs and the way round it (the old number of ranks), and rank 1,
    waiting for the conversion on the file system, stops with the same reason; exit 1,
    nothing of the conversion left, the checkpoint untouched."""
    from test_distributed import ACCEL, accelerate_launch

    zero2 = ["--config_file", str(ACCEL / "deepspeed_zero2.yaml")]
    more = [*ARGS, "data.cache_dir=" + str(tmp_path / "cache")]
    check(accelerate_launch([*zero2, "--num_processes", "1"], tmp_path / "a", "z", *more, "train.halt_at_step=4", base=[]))
    ckpt = tmp_path / "a" / "z" / "checkpoints" / "step-000004"
    shards = _du(ckpt / "pytorch_model")  # the ZeRO shards, every rank's
    fs = tmpfs(4 * _du(tmp_path / "a") + (1 << 20))
    subprocess.run(["cp", "-a", str(tmp_path / "a"), str(fs / "a")], check=True)
    used = shutil.disk_usage(fs).used
    tmpfs(used + 2 * shards, at=fs)  # room for one more checkpoint (about the shards), not a conversion (more)
    before = sorted((p.relative_to(fs), p.stat().st_size) for p in (fs / "a" / "z" / "checkpoints").rglob("*"))
    proc = accelerate_launch([*zero2, "--num_processes", "2"], fs / "a", "z", *more, base=[])
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert lines and "Traceback" not in proc.stderr.split(lines[0])[0], proc.stderr[-3000:]  # (torchrun's report follows)
    # rank 0's line, and rank 1's when it read the reason before torchrun ended it
    assert any(x.startswith(f"error: {fs / 'a' / 'z' / 'checkpoints' / 'step-000004'}: converting") for x in lines), lines
    assert all("converting its ZeRO shards to a universal checkpoint needs about" in x for x in lines), lines
    assert all("or run on 1 rank(s), where it needs no conversion" in x for x in lines), lines
    assert len(lines) <= 2 and (len(lines) == 1 or "rank 0 could not write the universal checkpoint" in "".join(lines))
    assert "converting step-" not in proc.stdout  # refused before it said it converts
    assert not (fs / "a" / "z" / "universal").exists()
    assert sorted((p.relative_to(fs), p.stat().st_size) for p in (fs / "a" / "z" / "checkpoints").rglob("*")) == before


def test_a_file_system_that_cannot_fsync_still_takes_checkpoints(tmp_path, monkeypatch):
    """Some FUSE and network mounts answer fsync with EINVAL or ENOTSUP: every save failed
    there (and was reported as a full disk). What they refuse is skipped; a real I/O error is not."""
    import errno
    import os

    from launcher.checkpoint import sync_tree

    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    (tmp_path / "ckpt" / "sub" / "shard.bin").write_bytes(b"x" * 10)
    answer = {"errno": errno.EINVAL}
    real = os.fsync

    def fsync(fd):
        if os.path.isfile(f"/proc/self/fd/{fd}") and answer["errno"]:
            raise OSError(answer["errno"], os.strerror(answer["errno"]))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for code in (errno.EINVAL, errno.ENOTSUP):
        answer["errno"] = code
        sync_tree(tmp_path / "ckpt")
    answer["errno"] = errno.EIO
    with pytest.raises(OSError, match="Input/output error"):
        sync_tree(tmp_path / "ckpt")
