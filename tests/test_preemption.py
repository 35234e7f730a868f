"""How much time a SIGTERM leaves, and what launcher says about it (launcher/preemption.py).
The real signal, torchrun's real SIGKILL and the resume are in test_distributed.py."""

from __future__ import annotations

import os

import pytest

from conftest import CONFIGS, TINY
from launcher import preemption
from launcher.cli import main


def test_launcher_train_gives_torchrun_its_grace_unless_the_user_set_one(monkeypatch):
    """`launcher train --accelerate-config` becomes `accelerate launch` (execve): torchrun reads
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT from that environment (default 30 s)."""
    seen = []

    def execve(path, argv, env):
        seen.append((argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    args = ["train", str(TINY), "--accelerate-config", str(CONFIGS / "accelerate" / "cpu_ddp.yaml"), "--num-processes", "2"]
    monkeypatch.delenv(preemption.ENV, raising=False)
    with pytest.raises(SystemExit):
        main(args)
    monkeypatch.setenv(preemption.ENV, "45")
    with pytest.raises(SystemExit):
        main(args)
    assert [env[preemption.ENV] for _, env in seen] == [str(preemption.GRACE_DEFAULT_S), "45"]
    assert seen[0][0][1:4] == ["-m", "launcher.launch", "--config_file"]


def test_a_step_plus_checkpoint_longer_than_the_grace_is_warned_once(monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv(preemption.ENV, "10")
    p = preemption.Preemption(is_main=True)
    p.stepped(3.0)
    p.saved(2, 4.0)  # 7 s: fits
    assert capsys.readouterr().err == ""
    p.stepped(5.0)
    p.saved(4, 6.0)  # 11 s: does not
    p.saved(6, 8.0)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: one step (5 s) plus a checkpoint (6 s) take longer than the 10 s")
    assert p.saved_step == 6


def test_outside_torchrun_nobody_knows_the_grace_and_nothing_is_claimed(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    p = preemption.Preemption(is_main=True)
    p.stepped(1e6)
    p.saved(1, 1e6)
    assert p.grace is None and capsys.readouterr().err == ""
