"""Builds the Accelerator from config + environment; the one home of rank facts.

On a host without a GPU, a plain `Accelerator()` under a multi-process launch reports rank 0
of 1 on every rank and skips DDP (shared/NOTES.md); launcher.engines chooses the arguments
that make each engine real on CPU too (gloo for DDP and DeepSpeed, FSDP2 switched on over
gloo). After construction the ranks are checked against torch.distributed itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from launcher import engines
from launcher.engines import Engine, full_numel, held
from launcher.errors import ConfigError

if typing.TYPE_CHECKING:
    from launcher.config import ModelConfig, TrainConfig
    from launcher.distributed import LaunchConfig


def env_world_size() -> int:
    """World size as the launcher (accelerate launch / torchrun / srun) announced it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """Global rank before any process group exists (0 outside a multi-process launch)."""
    return int(os.environ.get("RANK", "0"))


SAME_KEY_PRESS_S = 0.5  # two SIGINTs closer than this are one Ctrl-C delivered twice


def reduces_cpu_tensors(backend: str) -> bool:
    """Whether a process group of this backend string ("gloo", "nccl", "cpu:gloo,cuda:nccl")
    all-reduces CPU tensors."""
    return any(part.split(":")[-1] == "gloo" for part in str(backend).split(","))


@dataclass
class Runtime:
    accelerator: Any
    rank: int
    local_rank: int
    world_size: int
    num_nodes: int
    distributed_type: str
    engine: Engine = Engine()  # every engine decision (launcher.engines)
    weight_dtype: str = "float32"  # the dtype policy's answer for this launch (engines.weight_dtype)
    keeps_fp32_masters: bool = False  # the engine holds fp32 master weights (DeepSpeed, FSDP)
    notes: list | None = None  # what the launch decided for the run config (printed at start)
    preemption: Any = None  # preemption.Preemption once watch_signals has run
    collective_timeout_s: float = 1800.0  # train.collective_timeout_s: the host-flag group's too

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only rank that talks to trackers, draws progress, prints."""
        return self.rank == 0

    @property
    def device(self):
        return self.accelerator.device

    @property
    def job_id(self) -> str | None:
        """The scheduler's job id (Slurm), the same in every requeued attempt of the job."""
        return os.environ.get("SLURM_JOB_ID") or None

    def print(self, *args) -> None:
        if self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)  # above a live progress bar, not inside it

    def watch_signals(self) -> None:
        """SIGTERM (a scheduler or `kill`), SIGUSR1 (Slurm's warning before the time limit) and
        SIGINT (Ctrl-C) ask this rank to stop at the end of the step, as does the file named by
        LAUNCHER_STOP_FILE once it exists (rank 0 looks; slurm/train.sh creates it: signalling srun would
        cancel the job step outright). `stop_requested` turns the requests into one decision.
        A second Ctrl-C exits at once (preemption.Preemption.exit_now); one key press that
        arrives twice (a terminal's process group and a parent that forwards it) counts once."""
        import signal
        import time

        from launcher import preemption
        from launcher.preemption import STOP_SIGNALS, Preemption

        self.preemption = Preemption(self.is_main)
        interrupted_at: list = []

        def press() -> None:
            now = time.monotonic()
            if interrupted_at and now - interrupted_at[0] > SAME_KEY_PRESS_S:
                self.preemption.exit_now("SIGINT")
            interrupted_at.append(now)

        def request(signum, _frame):
            name = signal.Signals(signum).name
            if signum == signal.SIGINT and not (counted_apart and os.getpid() == watcher):  # (a forked worker: here)
                press()
            first = getattr(self, "_stop_signal", None) is None
            self._stop_signal = name
            if first:
                self.preemption.on_signal(self._stop_signal)

        counted_apart, watcher = False, os.getpid()
        for sig in STOP_SIGNALS:
            signal.signal(sig, request)

        # Counted as they arrive: a rank waiting in a collective for a rank in a long step got
        # both presses once that rank had left, as one, and died with a traceback (its
        # collective failed) before its stop counted.
        def arrived(data: bytes) -> None:
            for number in data:
                if number == signal.SIGINT:
                    press()

        counted_apart = preemption.watch_arrivals(arrived, "ctrl-c-presses")

    def stop_requested(self) -> str | None:
        """Whether any rank was signalled: a collective (max over ranks), so every rank stops
        at the same step. Returns the signal's name, or None. It runs after every step (and
        once before a new run's first: Trainer.run), on the host only (any_rank): the step's
        kernels are not waited for."""
        local = getattr(self, "_stop_signal", None)
        stop_file = os.environ.get("LAUNCHER_STOP_FILE")
        # slurm/train.sh's warning trap. Rank 0 alone looks (the reduce tells the others): a
        # thousand ranks each asking the shared file system after every step load its metadata server.
        if not local and stop_file and self.is_main and os.path.exists(stop_file):
            local = f"stop file {stop_file}"
        if self.any_rank(bool(local)):
            return local or "a signal to another rank"
        return None

    def inference_model(self, model):
        """The module to run forward passes on outside training (engines.inference_model)."""
        return engines.inference_model(self.engine, self.accelerator, model)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (a collective). The flag is a host value, so it is
        reduced on the host, over a CPU (gloo) group beside the engine's: a flag on the device
        would cost a copy there and a device-to-host sync that waits for every queued kernel."""
        if self.world_size == 1:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._host_group())
        return bool(t.item())

    def _host_group(self):
        """The process group for host-side flags: the default one where it already reduces CPU
        tensors with gloo (CPU launches, "cpu:gloo,cuda:nccl"), else a gloo group over every
        rank, made once, with the run's collective timeout. Every rank makes it at the same
        call, as a collective requires (any_rank is one). Across nodes gloo uses the interface
        the host name resolves to; GLOO_SOCKET_IFNAME names another (as NCCL_SOCKET_IFNAME)."""
        from datetime import timedelta

        import torch.distributed as dist

        if getattr(self, "_host_pg", None) is None:
            self._host_pg = (dist.group.WORLD if reduces_cpu_tensors(dist.get_backend()) else
                             dist.new_group(backend="gloo", timeout=timedelta(seconds=self.collective_timeout_s)))
        return self._host_pg

    def shared_token(self) -> str:
        """A random id that every rank of this job agrees on (a broadcast from rank 0)."""
        import uuid

        token = uuid.uuid4().hex
        if self.world_size > 1:
            import torch

            box = [token]
            torch.distributed.broadcast_object_list(box, src=0)
            token = box[0]
        return token

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (small and picklable), in rank order, on every rank. A collective."""
        if self.world_size == 1:
            return [obj]
        import torch

        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def data_cache(self, root, shared: bool = False):
        """The prepared-data cache as this rank sees it: local rank 0 of each node may build an
        entry (one per shared directory, or one per node-local directory); the rest wait for it
        on the file system, never in a collective (see data/cache.py)."""
        from launcher.data.cache import Cache

        return Cache(root, self.shared_token(), candidate=self.local_rank == 0, say=self.print,
                     label=f"rank {self.rank}", others_wait=self.world_size > 1, shared=shared)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def unwrap(self, model):
        """The bare model (engines.unwrap)."""
        return engines.unwrap(self.engine, self.accelerator, model)

    def on_main(self, fn: Callable, *args, **kwargs):
        """Run fn on rank 0 only, then barrier: file writes that every rank then relies on."""
        result = fn(*args, **kwargs) if self.is_main else None
        self.barrier()
        return result

    def progress(self, total: int, initial: int = 0, desc: str = "train", every_s: float = 30.0):
        """A tqdm bar on a terminal; elsewhere (Slurm, nohup, CI logs) a plain line at most
        every `every_s` seconds and at the end, with the bar's numbers and an ETA."""
        if not self.is_main:
            return contextlib.nullcontext(_NoBar())
        if not sys.stderr.isatty() and os.environ.get("LAUNCHER_PROGRESS") != "1":
            return contextlib.nullcontext(_PlainProgress(total, initial, every_s, self.print) if every_s > 0 else _NoBar())
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def model_init(self, random_weights: bool):
        """Where the model is built (engines.model_init decides how)."""
        return engines.model_init(self.engine, self.accelerator, random_weights)

    def parameter_counts(self, model) -> tuple[int, int, list[int]]:
        """(full parameter count, trainable count, elements held by each rank). A collective.

        Sharded parameters count whole (engines.full_numel) and held as the shard (engines.held).
        """
        import torch

        total = sum(full_numel(p) for p in model.parameters())
        trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
        here = sum(held(p) for p in model.parameters())
        per_rank = self.accelerator.gather(torch.tensor([here], device=self.device))
        return total, trainable, [int(x) for x in per_rank.tolist()]

    def prepare(self, model, optimizer, *rest):
        """The model, optimizer and the rest prepared by the engine (engines.prepare)."""
        return engines.prepare(self.engine, self.accelerator, model, optimizer, *rest)

    def write_rank_file(self, run_dir: Path, **extra) -> None:
        """RUN/ranks/rank-N.json from every rank: what this process really was (the launch's
        view next to torch.distributed's), so a multi-process run can be audited after the fact."""
        import socket

        import torch

        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        facts = self.facts() | {
            "node_rank": int(os.environ.get("GROUP_RANK", self.rank // max(1, self.world_size // self.num_nodes))),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "torch_distributed": {
                "rank": torch.distributed.get_rank() if dist else None,
                "world_size": torch.distributed.get_world_size() if dist else None,
                "backend": str(torch.distributed.get_backend()) if dist else None,
            },
            **extra,
        }
        out = run_dir / "ranks" / f"rank-{self.rank:05d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(facts, indent=1))

    def write_model_facts(self, run_dir: Path, model, optimizer, no_decay: set[str]) -> None:
        """RUN/ranks/model-rank-N.json after the first optimizer step: the dtypes this rank's
        parameters, fp32 masters and optimizer states really have, and which parameters
        take weight decay, so a test (or a user) can check the dtype policy per engine."""
        import hashlib
        from collections import Counter

        import torch

        def dtypes(tensors) -> dict:
            return dict(Counter(str(t.dtype).replace("torch.", "") for t in tensors))

        states, masters = [], []
        opt = optimizer
        for _ in range(5):  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch's AdamW
            states += [v for st in getattr(opt, "state", {}).values() if isinstance(st, dict)
                       for k, v in st.items() if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(v)]
            for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
                masters += [t for t in getattr(opt, attr, None) or [] if torch.is_tensor(t)]
            opt = getattr(opt, "optimizer", None)
            if opt is None:
                break
        names = sorted(n for n, p in self.unwrap(model).named_parameters() if p.requires_grad)
        decayed = [n for n in names if n not in no_decay]
        facts = {
            "parameters": dtypes(model.parameters()),
            "trainable": dtypes(p for p in model.parameters() if p.requires_grad),
            "fp32_masters": dtypes(masters),
            "optimizer_states": dtypes(states),
            "reduce_dtypes": engines.reduce_dtypes(model),
            "accumulate_dtypes": engines.accumulate_dtypes(model),
            "decayed": len(decayed),
            "not_decayed": len(names) - len(decayed),
            "decayed_sha": hashlib.sha256("\n".join(decayed).encode()).hexdigest()[:16],
            # where from_pretrained read the weights: a hub model's local snapshot (hub.resolve)
            "loaded_from": getattr(getattr(self.unwrap(model), "config", None), "_name_or_path", None),
        }
        out = run_dir / "ranks" / f"model-rank-{self.rank:05d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(facts, indent=1))

    def facts(self) -> dict:
        return {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "num_nodes": self.num_nodes,
            "distributed_type": self.distributed_type,
            "zero_stage": self.engine.zero_stage,
            "device": str(self.device),
            "slurm_job_id": self.job_id,
        }


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass


class _PlainProgress(_NoBar):
    """The progress bar's content as plain lines, for logs: `step 40/400 (10%)  loss=0.4312
    lr=2.0e-05  tok_s=5,120  eta 12m30s`, printed when the step's numbers arrive (set_postfix)
    and `every_s` has passed since the last line, and at the last step."""

    def __init__(self, total: int, initial: int, every_s: float, say):
        import time

        self.total, self.n, self.first, self.every_s, self.say = total, initial, initial, every_s, say
        self.started = self.last = time.monotonic()

    def update(self, n=1):
        self.n += n

    def set_postfix(self, *a, **values):
        import time

        now = time.monotonic()
        if now - self.last < self.every_s and self.n < self.total:
            return
        self.last = now
        done = self.n - self.first
        eta = (self.total - self.n) * (now - self.started) / done if done else 0.0
        minutes, seconds = divmod(int(eta), 60)
        hours, minutes = divmod(minutes, 60)
        eta_text = f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
        shown = "  ".join(f"{k}={v}" for k, v in values.items())
        self.say(f"step {self.n}/{self.total} ({self.n / max(self.total, 1):.0%})  {shown}  eta {eta_text}")


def resolve_launch(cfg, launch: "LaunchConfig | None" = None):
    """(the config to run, the launch, notes): what `accelerate launch` exported into the
    environment (or `launch`), with the values the run adopts from it resolved into the config,
    before anything is built from it. Nothing is written into the given config."""
    from launcher import distributed

    launch = launch or distributed.from_env()
    cfg, note = distributed.adopt_precision(cfg, launch)
    return cfg, launch, [note] if note else []


def build_runtime(t: "TrainConfig", model: "ModelConfig", launch: "LaunchConfig", notes: list[str] | None = None) -> Runtime:
    """The Accelerator for this process, after the run/accelerate/DeepSpeed configs agree: from
    the train and model sections of the config resolve_launch returns (the model's dtype, LoRA
    and quantization decide the weights' dtype and what this host can run), and the launch;
    `notes` are printed at start."""

    engines.check_or_raise(t, model, launch)  # before any process group starts

    import warnings

    import torch

    has_gpu = torch.cuda.is_available()
    engines.quiet_deepspeed_on_cpu()
    from accelerate import Accelerator

    # DeepSpeed 0.19 calls c10d APIs that torch 2.13 deprecates, once per bucket per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if has_gpu:  # TF32 matmuls for whatever still runs in fp32 (Ampere and later)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    problems = engines.host_problems(t, model, launch)
    if problems:
        raise ConfigError(*problems)
    world = env_world_size()
    accumulation = t.global_batch_size // (t.micro_batch_size * world)
    kwargs = engines.accelerator_kwargs(t, launch, accumulation, world, has_gpu)
    accelerator = Accelerator(**kwargs)
    engines.fsdp2_on_cpu(accelerator, launch, t.precision, has_gpu)
    engines.fsdp_reduce_in_fp32(accelerator, t.reduce_in_fp32)
    rank, world = accelerator.process_index, accelerator.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        true_rank, true_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if (rank, world) != (true_rank, true_world):
            raise RuntimeError(
                f"accelerate reports rank {rank} of {world} but torch.distributed says {true_rank} of {true_world}"
            )
    elif env_world_size() > 1:
        raise RuntimeError(f"WORLD_SIZE={env_world_size()} but no process group was started")
    engine = engines.built(accelerator, launch)  # the engine asked for, or RuntimeError
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return Runtime(
        accelerator=accelerator,
        rank=rank,
        local_rank=accelerator.local_process_index,
        world_size=world,
        num_nodes=max(1, world // max(local_world, 1)),
        distributed_type=str(accelerator.distributed_type).split(".")[-1],
        engine=engine,
        weight_dtype=engines.weight_dtype(t, model, launch),
        keeps_fp32_masters=engines.keeps_fp32_masters(launch),
        notes=list(notes or []),
        collective_timeout_s=t.collective_timeout_s,
    )
