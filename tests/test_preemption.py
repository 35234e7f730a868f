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


def _stop_worker(rank: int, port: int, out: str, side_group: bool) -> None:
    import torch.distributed as dist

    from launcher import runtime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if side_group:  # as under NCCL: the flags get a gloo group of their own
        runtime.reduces_cpu_tensors = lambda backend: False
    # No accelerator: the decision is made on the host alone, or this raises.
    rt = runtime.Runtime(accelerator=None, rank=rank, local_rank=rank, world_size=2, num_nodes=1,
                         distributed_type="MULTI_CPU", collective_timeout_s=60)
    said = [rt.stop_requested()]
    if rank == 1:
        rt._stop_signal = "SIGTERM"  # as watch_signals' handler sets it: this rank alone was signalled
    said.append(rt.stop_requested())
    said.append(rt._host_group() is dist.group.WORLD)
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(said))


@pytest.mark.distributed
@pytest.mark.parametrize("side_group", [False, True], ids=["default-gloo-group", "own-gloo-group"])
def test_a_signal_to_one_rank_stops_every_rank_decided_on_the_host(tmp_path, side_group):
    """The per-step stop decision is a max over ranks of a host flag: rank 0, never signalled,
    learns of rank 1's SIGTERM at the same call, without the accelerator (no device copy, no
    device-to-host sync); over the default group when it reduces CPU tensors, else over a gloo
    group of its own (an NCCL launch)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_stop_worker, args=(port, str(tmp_path / "said"), side_group), nprocs=2)
    assert (tmp_path / "said.0").read_text() == repr([None, "a signal to another rank", not side_group])
    assert (tmp_path / "said.1").read_text() == repr([None, "SIGTERM", not side_group])


def test_which_process_groups_reduce_cpu_tensors():
    from launcher.runtime import reduces_cpu_tensors

    assert [reduces_cpu_tensors(b) for b in ("gloo", "nccl", "cpu:gloo,cuda:nccl", "cuda:nccl")] == [True, False, True, False]
