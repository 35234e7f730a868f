"""Builds the Accelerator from config + environment; the one home of rank facts.

On a host without a GPU, a plain `Accelerator()` under a multi-process launch
reports rank 0 of 1 on every rank and skips DDP (shared/NOTES.md). So:
- CPU, several processes, no DeepSpeed: `Accelerator(cpu=True)` -> MULTI_CPU, DDP.
- CPU with DeepSpeed: a gloo process group via InitProcessGroupKwargs (cpu=True
  would silently drop DeepSpeed), and a DeepSpeedPlugin built from the JSON with
  every "auto" filled from the run config (launcher.distributed).
- FSDP2 on CPU: accelerate only turns FSDP on for GPU process groups, yet torch's
  FSDP2 (fully_shard) runs on gloo. So on a GPU-less host launcher starts the gloo
  group and switches accelerate's state to FSDP itself (cpu_fsdp2): the same sharding,
  DCP checkpoints and accumulation path as on GPUs, rehearsed on a laptop and in CI.
  FSDP1 on CPU is refused.
After construction the ranks are checked against torch.distributed itself.
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

from launcher.errors import ConfigError

if typing.TYPE_CHECKING:
    from launcher.distributed import LaunchConfig


def env_world_size() -> int:
    """World size as the launcher (accelerate launch / torchrun / srun) announced it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """Global rank before any process group exists (0 outside a multi-process launch)."""
    return int(os.environ.get("RANK", "0"))


@dataclass
class Runtime:
    accelerator: Any
    rank: int
    local_rank: int
    world_size: int
    num_nodes: int
    distributed_type: str
    zero_stage: int | None = None
    zero3_init: bool = False
    weight_dtype: str = "float32"  # the dtype policy's answer for this launch (distributed.weight_dtype)
    keeps_fp32_masters: bool = False  # the engine holds fp32 master weights (DeepSpeed, FSDP)
    notes: list = None  # what the launch decided for the run config (printed at start)
    preemption: Any = None  # preemption.Preemption once watch_signals has run

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
        """SIGTERM (a scheduler or `kill`) and SIGUSR1 (Slurm's warning before the time limit)
        ask this rank to stop, as does the file named by LAUNCHER_STOP_FILE once it exists
        (slurm/train.sh creates it: signalling srun would cancel the job step outright).
        `stop_requested` turns the requests into one decision."""
        import signal

        from launcher.preemption import Preemption

        self.preemption = Preemption(self.is_main)

        def request(signum, _frame):
            first = getattr(self, "_stop_signal", None) is None
            self._stop_signal = signal.Signals(signum).name
            if first:
                self.preemption.on_signal(self._stop_signal)

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request)

    def stop_requested(self) -> str | None:
        """Whether any rank was signalled: a collective (max over ranks), so every rank stops
        at the same step. Returns the signal's name, or None."""
        import torch

        local = getattr(self, "_stop_signal", None)
        stop_file = os.environ.get("LAUNCHER_STOP_FILE")
        if not local and stop_file and os.path.exists(stop_file):  # slurm/train.sh's warning trap
            local = f"stop file {stop_file}"
        if self.world_size == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        if self.accelerator.reduce(flag, reduction="max").item() > 0:
            return local or "a signal to another rank"
        return None

    @property
    def engine(self) -> str:
        """The engine as far as a checkpoint's layout goes: one process and DDP save the same full
        state ("full"); DeepSpeed ("deepspeed-zeroN") and FSDP ("fsdp") save shards per rank."""
        if self.zero_stage is not None:
            return f"deepspeed-zero{self.zero_stage}"
        if getattr(self.accelerator, "is_fsdp2", False) or self.distributed_type == "FSDP":
            return "fsdp"
        return "full"

    @property
    def engine_label(self) -> str:
        """The engine for people: DDP, ZeRO-3, FSDP2, ..."""
        if self.zero_stage is not None:
            return f"ZeRO-{self.zero_stage}"
        if getattr(self.accelerator, "is_fsdp2", False):
            return "FSDP2"
        return {"FSDP": "FSDP", "NO": "one process"}.get(self.distributed_type, "DDP")

    @property
    def shards_parameters(self) -> bool:
        """Whether no rank holds whole parameters (ZeRO-3, FSDP of either version): every forward
        pass is then a collective, so ranks must run as many of them (generation stays in step)."""
        return self.zero_stage == 3 or self.distributed_type == "FSDP" or bool(getattr(self.accelerator, "is_fsdp2", False))

    def inference_model(self, model):
        """The module to run forward passes on outside training (evaluation, generation): the bare
        model, except under FSDP1, whose root wrapper gathers the parameters it owns (the
        embeddings, the head) around each forward."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = model
        while hasattr(fsdp1, "module") and not isinstance(fsdp1, FullyShardedDataParallel):
            fsdp1 = fsdp1.module
        return fsdp1 if isinstance(fsdp1, FullyShardedDataParallel) else self.unwrap(model)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (a collective)."""
        if self.world_size == 1:
            return flag
        import torch

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="max").item() > 0)

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
        """The bare model. accelerate's unwrap_model imports deepspeed whenever it is installed
        (about 1 s of start-up, for nothing, in a DDP or single-process run), so without
        DeepSpeed the DDP / FSDP1 wrappers are stripped here (FSDP2 and plain models are
        not wrapped)."""
        if self.zero_stage is not None:
            return self.accelerator.unwrap_model(model)
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.nn.parallel import DistributedDataParallel

        while isinstance(model, (DistributedDataParallel, FullyShardedDataParallel)):
            model = model.module
        return model

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

    @contextlib.contextmanager
    def model_init(self, random_weights: bool):
        """Where the model is built. Under ZeRO-3 transformers builds it inside
        deepspeed.zero.Init, each rank allocating only its shard: right for pretrained
        weights, but a random init drawn that way differs from a single process's.
        So random inits (and zero3_init_flag: false) build whole; the engine shards at prepare.
        """
        plugin = self.accelerator.state.deepspeed_plugin if self.zero_stage == 3 else None
        if plugin is None or (self.zero3_init and not random_weights):
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # accelerate 1.15's zero3_init_context_manager(False) leaves it set
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    def parameter_counts(self, model) -> tuple[int, int, list[int]]:
        """(full parameter count, trainable count, elements held by each rank). A collective.

        Under ZeRO-3 a parameter's local tensor is a shard (`ds_tensor`) and `numel()` is 0;
        `ds_numel` is its full size. Under FSDP2 a parameter is a DTensor: `numel()` is the
        full size and its local tensor the shard.
        """
        import torch

        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        held = sum(_held(p) for p in model.parameters())
        per_rank = self.accelerator.gather(torch.tensor([held], device=self.device))
        return total, trainable, [int(x) for x in per_rank.tolist()]

    def prepare(self, model, optimizer, *rest):
        """accelerator.prepare, after choosing FSDP2's wrap units (fsdp2_wrap_units)."""
        if self.accelerator.is_fsdp2:
            fsdp2_wrap_units(self.accelerator.state.fsdp_plugin, model)
            fsdp2_storage_for_meta(model, optimizer)
        return self.accelerator.prepare(model, optimizer, *rest)

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
            "zero_stage": self.zero_stage,
            "device": str(self.device),
            "slurm_job_id": self.job_id,
        }


def _held(p) -> int:
    """Elements of parameter p this rank holds."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    local = getattr(p, "_local_tensor", None)  # an FSDP2 DTensor shard
    return (local if local is not None else p).numel()


def fsdp2_wrap_units(plugin, model) -> None:
    """The transformer classes FSDP2 shards as units: the model's _no_split_modules, less any
    that hold the input or output embeddings.

    accelerate 1.15 shards every _no_split_modules class, then the input embedding on its
    own; when the embedding sits inside a class already sharded (BERT, RoBERTa and MiniLM
    list BertEmbeddings), the second fully_shard sees DTensor parameters and fails
    ("Invariant encountered: value was None"). The embeddings join their own unit instead.
    An explicit fsdp_transformer_layer_cls_to_wrap is left as written.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    fn = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if fn is not transformer_auto_wrap_policy or plugin.transformer_cls_names_to_wrap is not None:
        return
    embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    holders = {type(m).__name__ for m in model.modules()
               if m not in embeddings and any(e is sub for e in embeddings for sub in m.modules())}
    plugin.transformer_cls_names_to_wrap = [n for n in (getattr(model, "_no_split_modules", None) or []) if n not in holders]


def fsdp2_storage_for_meta(model, optimizer) -> None:
    """Gives every parameter still on the meta device empty CPU storage, in the model and in
    the optimizer alike.

    Under fsdp_cpu_ram_efficient_loading, transformers loads the weights on rank 0 only and
    leaves the other ranks' parameters as empty CPU tensors, except those missing from the
    checkpoint (a new classification head), which stay on meta. accelerate 1.15 then maps each
    optimizer parameter to its sharded one by data_ptr(), and every meta tensor's is 0: the
    optimizer of rank 1 and up got the head's bias twice and its weight never, so that rank's
    shard of the weight never trained and the first checkpoint failed in DCP (KeyError) while
    rank 0 waited in a collective. Values do not matter here: accelerate broadcasts rank 0's
    weights into every shard at prepare.
    """
    import torch

    new: dict = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                if p not in new:
                    new[p] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                setattr(module, name, new[p])
    for group in optimizer.param_groups:
        group["params"] = [new.get(p, p) for p in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len({p.data_ptr() for p in params if p.numel()}) != sum(1 for p in params if p.numel()):
        raise RuntimeError("FSDP2: two optimizer parameters share storage; accelerate would map them to one shard")


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


def host_problems(cfg, launch: "LaunchConfig") -> list[str]:
    """What this machine cannot run, whatever the files say (one line each)."""
    import torch

    from launcher import distributed

    has_gpu = torch.cuda.is_available()
    out = []
    if cfg.train.precision == "fp16" and not has_gpu:
        out.append("train.precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if launch.distributed_type == distributed.FSDP and not has_gpu:
        if launch.fsdp_version != 2:
            out.append(
                f"{launch.source}: FSDP1 needs CUDA GPUs (accelerate enables FSDP only on GPU process groups); "
                "rehearse sharded training on CPU with configs/accelerate/fsdp2.yaml (fsdp_version: 2)"
            )
        elif launch.num_processes < 2:
            out.append(f"{launch.source}: FSDP2 on CPU needs 2 or more processes (--num_processes 2)")
    return out


def cpu_fsdp2(accelerator, precision: str) -> None:
    """Turn a gloo process group's accelerate state into FSDP2, as accelerate does for GPUs.

    accelerate 1.15 builds the FSDP plugin from the launch environment on any host but
    switches its state to FSDP only for GPU-like process groups (state.py), so on CPU
    an fsdp2.yaml launch would silently train as plain data parallel. torch's
    fully_shard, DCP and the accelerate FSDP2 code paths (prepare, accumulate, save_state,
    get_state_dict) all run on CPU tensors over gloo, so launcher makes the same switch:
    both state singletons say FSDP and hold the plugin, with the run's mixed precision.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch exported
    if plugin.fsdp_version != 2:
        raise RuntimeError(f"FSDP{plugin.fsdp_version} cannot run on CPU; use fsdp_version: 2")
    if precision != "no":
        plugin.set_mixed_precision(precision)
    state = AcceleratorState()
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    assert accelerator.is_fsdp2


def quiet_deepspeed_on_cpu() -> None:
    """On a host without a GPU, tell DeepSpeed so (what it would pick) before it is imported:
    otherwise it warns that it "was unable to detect" one, in every run that exports a model."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_runtime(cfg, launch: "LaunchConfig | None" = None) -> Runtime:
    """The Accelerator for this process, after the run/accelerate/DeepSpeed configs agree.

    `launch` defaults to what `accelerate launch` exported into the environment.
    """
    from datetime import timedelta

    from launcher import distributed

    t = cfg.train
    launch = launch or distributed.from_env()
    notes = [n for n in [distributed.adopt_precision(cfg, launch)] if n]
    distributed.check_or_raise(cfg, launch)  # before any process group starts

    import warnings

    import torch

    has_gpu = torch.cuda.is_available()
    quiet_deepspeed_on_cpu()
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    # DeepSpeed 0.19 calls c10d APIs that torch 2.13 deprecates, once per bucket per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if has_gpu:  # TF32 matmuls for whatever still runs in fp32 (Ampere and later)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    problems = host_problems(cfg, launch)
    if problems:
        raise ConfigError(*problems)
    world = env_world_size()
    accumulation = t.global_batch_size // (t.micro_batch_size * world)
    kwargs: dict = {"mixed_precision": t.precision, "gradient_accumulation_steps": accumulation}
    if launch.distributed_type == distributed.FSDP:
        from accelerate.utils import GradientAccumulationPlugin

        # FSDP under no_sync keeps whole, unsharded gradients on every rank until the last
        # micro-batch (out of memory on big models): reduce-scatter after every micro-batch.
        del kwargs["gradient_accumulation_steps"]
        kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(num_steps=accumulation, sync_each_batch=True)
    timeout = timedelta(seconds=t.collective_timeout_s)
    if world > 1:
        # On a GPU-less host the backend must be named: accelerate would otherwise pick none.
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend=None if has_gpu else "gloo", timeout=timeout)]
        if not has_gpu and launch.distributed_type not in (distributed.DEEPSPEED, distributed.FSDP):
            kwargs["cpu"] = True
    if launch.uses_deepspeed:
        ds_config, _ = distributed.resolve_deepspeed(cfg, launch)
        # The YAML's deepspeed_config keys (inline, as TRL's configs have them) are folded
        # into ds_config and checked against it above. accelerate would refuse them next to a
        # config it did not build itself, so its list of them is cleared for this process.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=launch.zero3_init)
    accelerator = Accelerator(**kwargs)
    if launch.distributed_type == distributed.FSDP and not has_gpu:
        cpu_fsdp2(accelerator, t.precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        true_rank, true_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if (rank, world) != (true_rank, true_world):
            raise RuntimeError(
                f"accelerate reports rank {rank} of {world} but torch.distributed says {true_rank} of {true_world}"
            )
    elif env_world_size() > 1:
        raise RuntimeError(f"WORLD_SIZE={env_world_size()} but no process group was started")
    if launch.uses_deepspeed and str(accelerator.distributed_type).split(".")[-1] != distributed.DEEPSPEED:
        raise RuntimeError(f"DeepSpeed was requested but accelerate set up {accelerator.distributed_type}")
    if launch.distributed_type == distributed.FSDP and not accelerator.is_fsdp2 and launch.fsdp_version == 2:
        raise RuntimeError(f"FSDP2 was requested but accelerate set up {accelerator.distributed_type}")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return Runtime(
        accelerator=accelerator,
        rank=rank,
        local_rank=accelerator.local_process_index,
        world_size=world,
        num_nodes=max(1, world // max(local_world, 1)),
        distributed_type=str(accelerator.distributed_type).split(".")[-1],
        zero_stage=launch.zero_stage if launch.uses_deepspeed else None,
        zero3_init=bool(accelerator.state.deepspeed_plugin.zero3_init_flag) if launch.uses_deepspeed else False,
        weight_dtype=distributed.weight_dtype(cfg, launch),
        keeps_fp32_masters=distributed.keeps_fp32_masters(launch),
        notes=notes,
    )
