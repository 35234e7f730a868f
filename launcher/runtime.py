"""Builds the Accelerator from config + environment; the one home of rank facts.

On a host without a GPU, a plain `Accelerator()` under a multi-process launch
reports rank 0 of 1 on every rank and skips DDP (shared/NOTES.md). So:
- CPU, several processes, no DeepSpeed: `Accelerator(cpu=True)` -> MULTI_CPU, DDP.
- CPU with DeepSpeed: a gloo process group via InitProcessGroupKwargs (cpu=True
  would silently drop DeepSpeed).
After construction the ranks are checked against torch.distributed itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from launcher.errors import ConfigError


def env_world_size() -> int:
    """World size as the launcher (accelerate launch / torchrun / srun) announced it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


@dataclass
class Runtime:
    accelerator: Any
    rank: int
    local_rank: int
    world_size: int
    num_nodes: int
    distributed_type: str

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only rank that talks to trackers, draws progress, prints."""
        return self.rank == 0

    @property
    def device(self):
        return self.accelerator.device

    def print(self, *args) -> None:
        if self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)  # above a live progress bar, not inside it

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def main_first(self):
        """Rank 0 does the work (e.g. writes a cache) while the others wait, then they follow."""
        return self.accelerator.main_process_first()

    def on_main(self, fn: Callable, *args, **kwargs):
        """Run fn on rank 0 only, then barrier: file writes that every rank then relies on."""
        result = fn(*args, **kwargs) if self.is_main else None
        self.barrier()
        return result

    def progress(self, total: int, initial: int = 0, desc: str = "train"):
        if not self.is_main or (not sys.stderr.isatty() and os.environ.get("LAUNCHER_PROGRESS") != "1"):
            return contextlib.nullcontext(_NoBar())
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def facts(self) -> dict:
        return {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "num_nodes": self.num_nodes,
            "distributed_type": self.distributed_type,
            "device": str(self.device),
        }


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass


def build_runtime(precision: str, gradient_accumulation_steps: int) -> Runtime:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    has_gpu = torch.cuda.is_available()
    if precision == "fp16" and not has_gpu:
        raise ConfigError("train.precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    kwargs: dict = {"mixed_precision": precision, "gradient_accumulation_steps": gradient_accumulation_steps}
    if not has_gpu and env_world_size() > 1:
        if _deepspeed_requested():
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    rank, world = accelerator.process_index, accelerator.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        true_rank, true_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if (rank, world) != (true_rank, true_world):
            raise RuntimeError(
                f"accelerate reports rank {rank} of {world} but torch.distributed says {true_rank} of {true_world}"
            )
    elif env_world_size() > 1:
        raise RuntimeError(f"WORLD_SIZE={env_world_size()} but no process group was started")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return Runtime(
        accelerator=accelerator,
        rank=rank,
        local_rank=accelerator.local_process_index,
        world_size=world,
        num_nodes=max(1, world // max(local_world, 1)),
        distributed_type=str(accelerator.distributed_type).split(".")[-1],
    )
