"""Every engine decision, in one room: one process and DDP (a "full" state on every rank),
DeepSpeed ZeRO-1/2/3, FSDP (FSDP2 on CPU and GPUs; FSDP1 on GPUs only).

The runtime holds an `Engine` (`rt.engine`); the trainer, the checkpointer, the tasks and the
lean loss ask it questions instead of testing an engine's name or reading its internals
(`ds_tensor`, `ds_numel`, `_local_tensor`, `is_fsdp2`): those live here, with the policies an
engine is started with (fp32 reduction: deepspeed_policy, fsdp_reduce_in_fp32) and how its
checkpoints merge offline (merged_weights). Reading and cross-checking the accelerate YAML
and DeepSpeed JSON is launcher.distributed's (the launch, before any process exists);
building the Accelerator is runtime.build_runtime's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import ConfigError

if typing.TYPE_CHECKING:
    from launcher.config import ModelConfig, TrainConfig
    from launcher.distributed import LaunchConfig


@dataclass(frozen=True)
class Engine:
    kind: str = "full"  # "full" (one process, DDP), "deepspeed", "fsdp"
    zero_stage: int | None = None
    fsdp2: bool = False
    zero3_init: bool = False  # DeepSpeed's zero3_init_flag: pretrained weights load shard by shard

    @classmethod
    def of(cls, accelerator, zero_stage: int | None, zero3_init: bool = False) -> "Engine":
        if zero_stage is not None:
            return cls("deepspeed", zero_stage, zero3_init=zero3_init)
        fsdp2 = bool(getattr(accelerator, "is_fsdp2", False))
        if fsdp2 or str(getattr(accelerator, "distributed_type", "")).endswith("FSDP"):
            return cls("fsdp", fsdp2=fsdp2)
        return cls()

    @property
    def deepspeed(self) -> bool:
        return self.kind == "deepspeed"

    @property
    def name(self) -> str:
        """The checkpoint layout: one process and DDP save the same full state ("full");
        DeepSpeed ("deepspeed-zeroN") and FSDP ("fsdp") save shards per rank."""
        return f"deepspeed-zero{self.zero_stage}" if self.deepspeed else self.kind

    @property
    def label(self) -> str:
        """For people: DDP (or one process), ZeRO-N, FSDP2, FSDP."""
        if self.deepspeed:
            return f"ZeRO-{self.zero_stage}"
        if self.kind == "fsdp":
            return "FSDP2" if self.fsdp2 else "FSDP"
        return "DDP"

    @staticmethod
    def layout_label(name: str) -> str:
        """A checkpoint's recorded layout (Engine.name) for people: "full" read as an engine."""
        if name.startswith("deepspeed-zero"):
            return f"ZeRO-{name.removeprefix('deepspeed-zero')}"
        return {"full": "one process or DDP", "fsdp": "FSDP"}.get(name, name)

    @property
    def reshards_on_load(self) -> bool:
        """Whether a checkpoint of this layout loads on another number of ranks: a full state
        anywhere; FSDP2's DCP shards are resharded by torch.distributed.checkpoint (model and
        optimizer: accelerate loads both through DCP's sharded state dicts); ZeRO-1/2/3 shards
        through DeepSpeed's universal checkpoint (universal_view, universal_load). Not ZeRO-0's
        (no optimizer shards to convert)."""
        return self.name == "full" or self.fsdp2 or (self.deepspeed and self.zero_stage in (1, 2, 3))

    @property
    def converts_to_universal(self) -> bool:
        """Whether a checkpoint of another world size is converted before it loads (ZeRO shards,
        to DeepSpeed's universal checkpoint: universal_view, universal_load)."""
        return self.deepspeed and self.reshards_on_load

    @property
    def reshard_how(self) -> str:
        """How a checkpoint of another world size loads, for the resume line."""
        if self.deepspeed:
            return (f"its ZeRO-{self.zero_stage} shards are converted to DeepSpeed's universal checkpoint, "
                    "which partitions the weights, fp32 masters and Adam moments anew")
        return "DCP reshards the FSDP2 model and optimizer state" if self.fsdp2 else "the full state loads anywhere"

    @property
    def save_collectives(self) -> bool:
        """The engine's save runs collectives of its own (DeepSpeed's tag check and barrier, DCP's
        phases): a rank whose save failed cannot meet the others anywhere after it."""
        return self.kind in ("deepspeed", "fsdp")

    @property
    def shards_parameters(self) -> bool:
        """No rank holds whole parameters (ZeRO-3, FSDP): every forward pass is then a
        collective, so ranks must run as many of them (generation stays in step)."""
        return self.zero_stage == 3 or self.kind == "fsdp"

    def builds_sharded(self, random_weights: bool) -> bool:
        """ZeRO-3 with zero3_init builds a pretrained model inside deepspeed.zero.Init, each rank
        allocating only its shard. A random init drawn that way differs from a single
        process's, so random inits build whole and the engine shards them at prepare."""
        return self.zero_stage == 3 and self.zero3_init and not random_weights

    def builds_whole_under_zero3(self, random_weights: bool) -> bool:
        """ZeRO-3 whose model must be built whole (transformers' deepspeed.zero.Init switched off),
        then sharded by the engine at prepare: a random init, or zero3_init_flag: false."""
        return self.zero_stage == 3 and not self.builds_sharded(random_weights)

    def export_reads_masters(self, precision: str, export_dtype: str, lora: bool) -> bool:
        """DeepSpeed trains 16-bit weights (train.precision bf16 or fp16) over fp32 masters: an
        export in any other dtype (wider, or the other 16-bit format) is read from the masters
        of the exported step's checkpoint, as `launcher export` reads it, not cast from the
        16-bit copy. (A LoRA export merges the live adapters.)"""
        trained = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
        return self.deepspeed and not lora and trained is not None and export_dtype != trained

    def frozen_policy(self, trainable_only: bool) -> "FrozenPolicy":
        """How a checkpoint leaves out frozen parameters (LoRA on a pretrained base)."""
        if not trainable_only:
            return FrozenPolicy()
        if self.deepspeed:  # the engine's own switch
            return FrozenPolicy(save_kwargs={"exclude_frozen_parameters": True}, load_kwargs={"load_module_strict": False})
        if self.fsdp2:  # DCP takes no filter: state-dict hooks around save and load (checkpoint.frozen_left_out)
            return FrozenPolicy(state_dict_hooks=True)
        # DDP / one process: a hook on the state dict accelerate saves; loading non-strict on the
        # model weights only, after checking that every trained weight is there
        return FrozenPolicy(load_kwargs={"strict": False}, save_hook=True, check_saved=True)


@dataclass(frozen=True)
class FrozenPolicy:
    save_kwargs: dict | None = None
    load_kwargs: dict | None = None
    save_hook: bool = False  # accelerate's save_state pre-hook drops the frozen weights
    state_dict_hooks: bool = False  # the model's own state dict leaves them out (FSDP2)
    check_saved: bool = False  # before loading: every trainable weight is in the checkpoint


@contextlib.contextmanager
def model_init(engine: Engine, accelerator, random_weights: bool) -> Iterator[None]:
    """Where the model is built. Under ZeRO-3 transformers builds it inside
    deepspeed.zero.Init, each rank allocating only its shard: right for pretrained weights,
    but a random init drawn that way differs from a single process's. So random inits (and
    zero3_init_flag: false) build whole, and the engine shards them at prepare."""
    if not engine.builds_whole_under_zero3(random_weights):
        yield
        return
    plugin = accelerator.state.deepspeed_plugin
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # accelerate 1.15's zero3_init_context_manager(False) leaves it set
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


# What accelerate names DeepSpeed's checkpoint tag (its save_state's ckpt_id).
DEEPSPEED_TAG = "pytorch_model"


def universal_view(ckpt: Path, view: Path) -> None:
    """DeepSpeed's universal checkpoint of `ckpt`'s ZeRO shards, at `view`: per parameter, the
    whole fp32 master and Adam moments, which any number of ranks partitions again on load.
    Written by one process, with DeepSpeed's own converter (ds_to_universal, serially: no
    process pool inside a training process), into a temporary directory renamed at the end.
    Beside it, links to accelerate's files of `ckpt` (RNG states, scheduler), so that
    accelerate's load_state reads `view` as it reads a checkpoint."""
    import shutil
    from types import SimpleNamespace

    from deepspeed.checkpoint import ds_to_universal

    tmp = view.with_name(f".tmp-{view.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # inject_missing_state: DeepSpeed records the universal-checkpoint facts for tensor-parallel
    # models only; a plain data-parallel model's shards need them added to convert.
    said = io.StringIO()  # the converter's progress: shown only if it fails
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal.main(SimpleNamespace(
                input_folder=str(ckpt / DEEPSPEED_TAG), output_folder=str(tmp / DEEPSPEED_TAG), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    except BaseException:
        sys.stderr.write(said.getvalue())
        raise
    for f in ckpt.iterdir():  # relative links: nodes may mount the run directory at other paths
        if f.is_file() and f.name != "latest":
            os.symlink(os.path.relpath(f, tmp), tmp / f.name)
    os.replace(tmp, view)


def merged_weights(ckpt: Path) -> tuple[dict, str]:
    """The full model state dict held by a checkpoint of any engine, read in this one process
    (`launcher export`, and the fp32 masters an export reads): each engine's own layout on
    disk. Returns it and a description of what was read."""
    if (ckpt / "latest").is_file():  # DeepSpeed: per-rank ZeRO shards under the tag named in `latest`
        import contextlib
        import io

        quiet_deepspeed_on_cpu()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The tag named, not read from `latest`: DeepSpeed joins its text to the path, so a
        # `latest` reading "../elsewhere" loaded pickles from outside the checked checkpoint.
        if not (ckpt / DEEPSPEED_TAG).is_dir():
            raise ConfigError(f"{ckpt}: it has DeepSpeed's `latest` file but no {DEEPSPEED_TAG}/ shards: not a "
                              "checkpoint launcher wrote")
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress per shard
            return (get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DEEPSPEED_TAG),
                    "DeepSpeed ZeRO shards (fp32 master weights)")
    fsdp = sorted(ckpt.glob("pytorch_model_fsdp_0*"))
    if fsdp and fsdp[0].is_dir():  # FSDP SHARDED_STATE_DICT: a torch.distributed.checkpoint directory
        import tempfile

        import torch
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(fsdp[0]), f"{tmp}/model.pt")
            sd = torch.load(f"{tmp}/model.pt", weights_only=True)
        return sd.get("model", sd), "FSDP sharded state dict"
    for name in ("model.safetensors", "pytorch_model_fsdp_0.bin", "pytorch_model.bin"):
        if (ckpt / name).is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(ckpt / name), name
            import torch

            return torch.load(ckpt / name, weights_only=True), name
    raise ConfigError(
        f"{ckpt}: no model weights found (expected model.safetensors, a DeepSpeed `latest` tag, "
        "or pytorch_model_fsdp_0/)"
    )


def universal_need(ckpt: Path, engine: Engine, tensors: int, writers: int) -> int:
    """About the most disk universal_view of `ckpt` takes at once (an upper bound). The
    converter's per-rank slices and the merged per-parameter states (fp32 master, Adam moments,
    step) are on disk together before it removes the slices: twice the optimizer shards; it
    copies the model states (counted twice here too: margin). Under ZeRO-3 it also writes rank
    0's whole optimizer file as zero/optimizer_state.pt (ds_to_universal's stage-3
    optimizer-state save) before the slices go. Each of the `tensors` trained tensors gets 4
    small files per writing rank and 4 merged ones: a file system block (4 KiB) each at least,
    which is what a small model's conversion is mostly made of."""
    files = [f for f in (ckpt / DEEPSPEED_TAG).rglob("*") if f.is_file()]
    need = 2 * sum(f.stat().st_size for f in files) + tensors * 4 * (writers + 1) * 4096
    if engine.zero_stage == 3:
        need += sum(f.stat().st_size for f in files if f.name.startswith("zero_pp_rank_0_") and "optim_states" in f.name)
    return need


@contextlib.contextmanager
def universal_load(model, optimizer) -> Iterator[None]:
    """Around accelerate's load_state of a universal_view: the DeepSpeed engine reads its
    load_universal switch at every load (and only then), so it is on for this one; a later
    load of an ordinary checkpoint (the best, at the end) finds it off. The groups' own
    weight decay, betas and eps are put back after it: ZeRO-3's universal load gives every
    group the first one's (stage3.py), which would put weight decay on the no-decay group."""
    import torch

    fixed = ("weight_decay", "betas", "eps")
    own = [{k: g[k] for k in fixed if k in g} for g in optimizer.param_groups]
    model._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        model._config.load_universal_checkpoint = False
    for group, values in zip(optimizer.param_groups, own):
        group.update(values)
    # Adam's step counter: ZeRO-3's universal load hands one tensor to every sub-group's state
    # (stage3.py), and each sub-group's optimizer step then adds 1 to it in place, so every
    # sub-group after the first corrects its moments' bias for a later step than it is at.
    # Each state gets its own copy; on the parameter's device for a fused or capturable
    # optimizer, whose kernels expect it there (torch's own load_state_dict does both).
    inner = getattr(getattr(model, "optimizer", None), "optimizer", None)
    if inner is None:
        return
    on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
    for p, state in inner.state.items():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.detach().to(device=p.device if on_device else step.device, copy=True)


# DDP's own record of its buckets' dtypes (c10 type names) and of a compressing comm hook.
_DDP_DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}
_DDP_HOOKS = {"fp16_compress_hook": "float16", "bf16_compress_hook": "bfloat16"}


def reduce_dtypes(model) -> list[str]:
    """The dtypes this rank's gradients are reduced in, as the engine holds them: DeepSpeed's
    communication_data_type; each FSDP2 parameter's own (its reduce dtype, else the dtype it
    computes in); DDP's buckets' as its reducer logged them, or its compress hook's;
    otherwise (one process: nothing is reduced) the trainable parameters'."""
    import torch

    found = set()
    comm = getattr(model, "communication_data_type", None)  # a DeepSpeedEngine
    if comm is not None:
        found.add(comm)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        logged = model._get_ddp_logging_data() if getattr(model, "logger", None) is not None else {}
        hook = logged.get("comm_hook")
        if hook:
            return [_DDP_HOOKS.get(hook, hook)]  # another hook (PowerSGD, ...): its name, not a guess
        if logged.get("dtypes"):
            return sorted(_DDP_DTYPES.get(d.strip(), d.strip()) for d in str(logged["dtypes"]).split(",") if d.strip())
    for module in model.modules():
        state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
        group = state._fsdp_param_group if state is not None else None
        for fp in group.fsdp_params if group is not None else []:
            if fp.sharded_param.requires_grad:
                found.add(fp.reduce_dtype or fp.param_dtype or fp.orig_dtype)
    return _dtype_names(found or _trainable_dtypes(model))


def _trainable_dtypes(model) -> set:
    return {p.dtype for p in model.parameters() if p.requires_grad}


def _dtype_names(dtypes) -> list[str]:
    return sorted(str(d).replace("torch.", "") for d in dtypes)


def accumulate_dtypes(model) -> list[str]:
    """The dtypes this rank sums micro-batch gradients in: DeepSpeed's ZeRO optimizer's
    gradient accumulation dtype; otherwise the trainable parameters' (their .grad, and FSDP2's
    sharded gradients, have the parameters' dtype)."""
    optimizer = getattr(model, "optimizer", None)  # a DeepSpeedEngine's
    dtype = getattr(optimizer, "gradient_accumulation_dtype", None) or getattr(optimizer, "grad_acc_dtype", None)
    return _dtype_names({dtype} if dtype is not None else _trainable_dtypes(model))


def full_numel(p) -> int:
    """A parameter's whole size: under ZeRO-3 `numel()` is 0 and `ds_numel` the size; an FSDP2
    DTensor's `numel()` is already the whole size; a bitsandbytes 4-bit weight packs two
    values per element, its quantization state knows the shape."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        return int(shape.numel())
    return getattr(p, "ds_numel", p.numel())


def held(p) -> int:
    """Elements of parameter p this rank holds: a ZeRO-3 shard (`ds_tensor`), an FSDP2 DTensor's
    local shard, or the whole parameter."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    local = getattr(p, "_local_tensor", None)
    return (local if local is not None else p).numel()


@contextlib.contextmanager
def for_generation(engine: Engine, model, bare, device, any_rank) -> Iterator[tuple[typing.Any, bool, str | None]]:
    """(module, lockstep, note) for evaluation and generation: the module to run forward passes
    on (`bare`, the inference model), whether each of them is a collective there (every rank
    must then run as many: generation keeps the ranks in step), and a line saying what was
    done to make them cheaper (None when nothing).

    Under ZeRO-3 a forward all-gathers every layer, so a generated token costs a whole-model
    all-gather. When the whole model fits in half this rank's free memory, it is gathered once around evaluation
    and DeepSpeed's per-module hooks lifted meanwhile (deepspeed's own
    unwrap_model_for_generation): forwards need no all-gather, and the shards are restored
    after. FSDP keeps its per-forward gathers. any_rank(flag): whether
    the flag holds on any rank (runtime.any_rank)."""
    need = sum(full_numel(p) * p.element_size() for p in bare.parameters())
    # The gather is a collective: every rank must decide alike (any_rank: a collective too),
    # though each measures its own free memory.
    if engine.zero_stage == 3 and not any_rank(need > _free_bytes(device) // 2):
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        # Still in lockstep: the hook DeepSpeed leaves on the root module broadcasts in the
        # first forward passes after its hooks come back (its trace is rebuilt), so ranks must
        # run as many of them; the per-token flag costs nothing beside an all-gather.
        with unwrap_model_for_generation(model):
            yield bare, True, (f"ZeRO-3: evaluation gathers the whole model once ({need / 2**20:,.0f} MiB per rank), "
                               "not once per generated token")
        return
    yield bare, engine.shards_parameters, None


def _free_bytes(device) -> int:
    """This rank's share of free memory: the GPU's, or on CPU the host's available memory over
    the ranks on this node."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def is_partitioned(p) -> bool:
    """The parameter is a shard on this rank (ZeRO-3 or FSDP2), not a whole tensor."""
    return hasattr(p, "ds_tensor") or hasattr(p, "_local_tensor")


# ---- building the engine (runtime.build_runtime)
#
# On a host without a GPU, a plain `Accelerator()` under a multi-process launch reports rank 0
# of 1 on every rank and skips DDP (shared/NOTES.md). So:
# - CPU, several processes, no DeepSpeed: `Accelerator(cpu=True)` -> MULTI_CPU, DDP.
# - CPU with DeepSpeed: a gloo process group via InitProcessGroupKwargs (cpu=True would silently
#   drop DeepSpeed), and a DeepSpeedPlugin built from the JSON with every "auto" filled from the
#   run config (launcher.distributed).
# - FSDP2 on CPU: accelerate only turns FSDP on for GPU process groups, yet torch's FSDP2
#   (fully_shard) runs on gloo. So on a GPU-less host launcher starts the gloo group and switches
#   accelerate's state to FSDP itself (cpu_fsdp2): the same sharding, DCP checkpoints and
#   accumulation path as on GPUs, rehearsed on a laptop and in CI. FSDP1 on CPU is refused.


def fsdp_reduce_in_fp32(accelerator, on: bool) -> None:
    """FSDP with bf16/fp16 compute: accelerate's policy reduces gradients, and returns the
    model's outputs, in the compute dtype (reduce_dtype = bf16; output_dtype bf16, or None from
    accelerate 1.16: the outputs stay bf16 all the same), so a loss sum comes back in bf16.
    train.reduce_in_fp32 makes both fp32, as torchtitan does; parameters
    still compute in the low dtype. (DeepSpeed's communication_data_type is filled into its
    JSON: deepspeed_policy.)"""
    import dataclasses

    import torch

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if not on or plugin is None or policy is None or isinstance(policy, dict) or \
            getattr(policy, "param_dtype", None) in (None, torch.float32):
        return
    wider = {"reduce_dtype": torch.float32}
    if hasattr(policy, "output_dtype"):  # FSDP2's MixedPrecisionPolicy
        wider["output_dtype"] = torch.float32
    plugin.mixed_precision_policy = dataclasses.replace(policy, **wider)


@dataclass(frozen=True)
class Planned:
    """What `launcher plan` needs of the engine a launch asks for, before any process exists."""

    label: str  # for people: DeepSpeed ZeRO-N, FSDP, DDP, single process
    shard_stage: int  # what is partitioned, in ZeRO's terms (FSDP's full shard is 3)
    sixteen_bit_copy: bool  # a 16-bit copy of the weights beside the fp32 masters (DeepSpeed mixed precision)


def planned(launch: "LaunchConfig", precision: str) -> Planned:
    from launcher import distributed

    if launch.uses_deepspeed:
        stage = launch.zero_stage or 0
        return Planned(f"DeepSpeed ZeRO-{stage}", stage, precision in ("bf16", "fp16"))
    if launch.distributed_type == distributed.FSDP:
        return Planned("FSDP (full shard ~ ZeRO-3)", 3, False)
    return Planned("DDP" if launch.num_processes > 1 else "single process", 0, False)


def keeps_fp32_masters(launch: "LaunchConfig") -> bool:
    """Whether the engine keeps fp32 master weights of its own (DeepSpeed, FSDP mixed precision)."""
    from launcher import distributed

    return launch.uses_deepspeed or launch.distributed_type == distributed.FSDP


def dtype_problems(t: "TrainConfig", model: "ModelConfig", launch: "LaunchConfig") -> list[str]:
    """bf16 weights where no engine keeps fp32 masters for them (one line each)."""
    if model.dtype != "bfloat16":
        return []
    if t.precision != "bf16":
        return [f"model.dtype: bfloat16 weights with train.precision {t.precision}: set train.precision=bf16, or model.dtype=auto"]
    if not keeps_fp32_masters(launch) and not model.lora.enabled:
        return [f"model.dtype: bfloat16 under {launch.distributed_type} ({launch.source}) leaves AdamW no fp32 master "
                "weights (small updates round to zero); use model.dtype=auto (fp32 weights, bf16 compute), "
                "LoRA, or DeepSpeed/FSDP"]
    return []


def weight_dtype(t: "TrainConfig", model: "ModelConfig", launch: "LaunchConfig") -> str:
    """The one dtype policy: what the model's weights are loaded as (see config: model.dtype)."""
    if model.dtype != "auto":
        return model.dtype
    if t.precision == "bf16" and (keeps_fp32_masters(launch) or model.lora.enabled):
        return "bfloat16"
    return "float32"


def launch_problems(t: "TrainConfig", model: "ModelConfig", launch: "LaunchConfig") -> list[str]:
    """Every contradiction between the run's train and model sections and the launch files
    (distributed.check), and the dtype policy's; one line each."""
    from launcher import distributed

    return distributed.check(t, model, launch) + dtype_problems(t, model, launch) + model_problems(t, model, launch)


def model_problems(t: "TrainConfig", model: "ModelConfig", launch: "LaunchConfig") -> list[str]:
    """What the model section asks that the run's precision or processes cannot run on any
    machine: `launcher plan` on a login node finds these as the launch does (one line each)."""
    out = []
    if model.attn_implementation == "flash_attention_2" and t.precision not in ("bf16", "fp16"):
        out.append(f"model.attn_implementation: flash_attention_2 runs in bf16 or fp16 only, and train.precision is "
                   f"{t.precision} (fp32): set train.precision=bf16, or use auto or sdpa")
    if t.precision == "fp16" and launch.use_cpu:  # (the files say so: `plan` on a GPU login node too)
        out.append(f"train.precision: fp16 needs a CUDA GPU, and {launch.source} says use_cpu: true; use bf16 or no")
    q = model.quantization
    if q != "none" and (launch.num_processes > 1 or launch.distributed_type != "NO"):
        out.append(f"model.quantization: {q} runs on one process for now (bitsandbytes' packed base weights under "
                   f"DDP, ZeRO and FSDP2 are not tested here); launch without {launch.source}")
    return out


def check_or_raise(t: "TrainConfig", model: "ModelConfig", launch: "LaunchConfig") -> None:
    problems = launch_problems(t, model, launch)
    if problems:
        raise ConfigError(*problems)


def built(accelerator, launch: "LaunchConfig") -> Engine:
    """The engine accelerate really set up, which must be the one the launch asked for."""
    from launcher import distributed

    if launch.uses_deepspeed and str(accelerator.distributed_type).split(".")[-1] != distributed.DEEPSPEED:
        raise RuntimeError(f"DeepSpeed was requested but accelerate set up {accelerator.distributed_type}")
    if launch.distributed_type == distributed.FSDP and not accelerator.is_fsdp2 and launch.fsdp_version == 2:
        raise RuntimeError(f"FSDP2 was requested but accelerate set up {accelerator.distributed_type}")
    if launch.uses_deepspeed:
        return Engine.of(accelerator, launch.zero_stage, bool(accelerator.state.deepspeed_plugin.zero3_init_flag))
    return Engine.of(accelerator, None)


def deepspeed_policy(t: "TrainConfig", launch: "LaunchConfig") -> dict[str, tuple[typing.Any, str]]:
    """DeepSpeed config keys this engine policy sets where the JSON leaves them unset: with
    bf16/fp16 and train.reduce_in_fp32, gradients are reduced in fp32 (DeepSpeed's default:
    the compute dtype) and, under ZeRO-2/3, summed over micro-batches in fp32 (default: the
    weights' 16-bit dtype). Not the sum under ZeRO-1: there DeepSpeed answers fp32 with its
    BF16_Optimizer, another optimizer with another checkpoint layout."""
    if not launch.uses_deepspeed or t.precision == "no" or not t.reduce_in_fp32:
        return {}
    policy: dict[str, tuple[typing.Any, str]] = {"communication_data_type": ("fp32", "train.reduce_in_fp32")}
    if launch.zero_stage in (2, 3):
        policy["data_types.grad_accum_dtype"] = ("fp32", "train.reduce_in_fp32")
    return policy


def deepspeed_config(t: "TrainConfig", launch: "LaunchConfig") -> tuple[dict, list[tuple[str, typing.Any, str]]]:
    """The DeepSpeed config the engine starts with, and what was filled (distributed.resolve_deepspeed
    with this module's policy)."""
    from launcher import distributed

    return distributed.resolve_deepspeed(t, launch, deepspeed_policy(t, launch))


def accelerator_kwargs(t: "TrainConfig", launch: "LaunchConfig", accumulation: int, world: int, has_gpu: bool) -> dict:
    """The Accelerator's arguments for this launch's engine (from the run's train section)."""
    from datetime import timedelta

    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    from launcher import distributed

    kwargs: dict = {"mixed_precision": t.precision, "gradient_accumulation_steps": accumulation}
    if launch.distributed_type == distributed.FSDP:
        from accelerate.utils import GradientAccumulationPlugin

        # FSDP under no_sync keeps whole, unsharded gradients on every rank until the last
        # micro-batch (out of memory on big models): reduce-scatter after every micro-batch.
        del kwargs["gradient_accumulation_steps"]
        kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(num_steps=accumulation, sync_each_batch=True)
    if world > 1:
        # On a GPU-less host the backend must be named: accelerate would otherwise pick none.
        timeout = timedelta(seconds=t.collective_timeout_s)
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend=None if has_gpu else "gloo", timeout=timeout)]
        if not has_gpu and launch.distributed_type not in (distributed.DEEPSPEED, distributed.FSDP):
            kwargs["cpu"] = True
    if launch.uses_deepspeed:
        ds_config, _ = deepspeed_config(t, launch)
        # The YAML's deepspeed_config keys (inline, as TRL's configs have them) are folded
        # into ds_config and checked against it above. accelerate would refuse them next to a
        # config it did not build itself, so its list of them is cleared for this process.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=launch.zero3_init)
    return kwargs


def host_problems(t: "TrainConfig", model: "ModelConfig", launch: "LaunchConfig") -> list[str]:
    """What this machine cannot run, whatever the files say (one line each)."""
    import torch

    from launcher import distributed

    has_gpu = torch.cuda.is_available()
    out = []
    if t.precision == "fp16" and not has_gpu and not launch.use_cpu:  # (use_cpu: model_problems says it)
        out.append("train.precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if launch.distributed_type == distributed.FSDP and not has_gpu:
        if launch.fsdp_version != 2:
            out.append(
                f"{launch.source}: FSDP1 needs CUDA GPUs (accelerate enables FSDP only on GPU process groups); "
                "rehearse sharded training on CPU with configs/accelerate/fsdp2.yaml (fsdp_version: 2)"
            )
        elif launch.num_processes < 2:
            out.append(f"{launch.source}: FSDP2 on CPU needs 2 or more processes (--num_processes 2)")
        elif t.precision == "bf16":  # seen: "mixed dtype (CPU): expect parameter to have scalar type of Float"
            out.append(f"{launch.source}: FSDP2 with train.precision=bf16 does not run on CPU (under autocast, layer "
                       "norms meet FSDP's bf16 parameters); rehearse it with train.precision=no")
    q = model.quantization
    if q != "none" and importlib.util.find_spec("bitsandbytes") is None:
        out.append(f"model.quantization: {q} needs the bitsandbytes package (pip install 'launcher[qlora]')")
    if launch.uses_deepspeed:
        out += [f"{lock}: a DeepSpeed kernel build left this lock {age // 60} minutes ago and nothing in its folder "
                "changed since (killed?); every DeepSpeed launch waits on it forever: delete it unless a build is running"
                for lock, age in stale_build_locks()]
    return out


BUILD_LOCK_STALE_S = 600  # a DeepSpeed kernel builds in a minute or a few; a lock this old was left behind


def stale_build_locks(now: float | None = None) -> list[tuple[Path, int]]:
    """DeepSpeed kernel build locks that a killed build left, with their age in seconds.
    DeepSpeed compiles its kernels (e.g. its CPU shared-memory collectives) with torch's
    extension builder, which creates `<build dir>/lock` once and deletes it when the build
    ends; a build killed mid-way leaves it, and later builders wait for it without a word,
    forever. Stale: neither the lock nor anything in its build directory changed for
    BUILD_LOCK_STALE_S (a running build writes its objects there). Only this interpreter's
    build folder (as torch names it) and DeepSpeed's kernel names are looked at."""
    import re
    import time

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:  # torch.utils.cpp_extension._get_build_directory's folder
        accel = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                 f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        root = os.path.join(get_default_build_root(),
                            f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}")
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations or not os.path.isdir(root):
        return []
    builders = Path(spec.submodule_search_locations[0]) / "ops" / "op_builder"
    names = {m for f in builders.rglob("*.py") for m in re.findall(r'^\s+NAME = "(\w+)"', f.read_text(), re.M)}
    now = time.time() if now is None else now
    out = []
    for name in sorted(names):
        lock = Path(root) / name / "lock"
        with contextlib.suppress(OSError):  # no lock, or gone meanwhile: the build ended
            if quiet_for(lock, now) > BUILD_LOCK_STALE_S:
                out.append((lock, int(now - lock.stat().st_mtime)))
    return out


def quiet_for(lock: Path, now: float) -> float:
    """Seconds since a build lock or anything in its build folder last changed (a build at
    work writes its objects there). OSError when the lock is gone."""
    return now - max(p.stat().st_mtime for p in [lock, *lock.parent.rglob("*")])


def unwrap(engine: Engine, accelerator, model):
    """The bare model. accelerate's unwrap_model imports deepspeed whenever it is installed
    (about 1 s of start-up, for nothing, in a DDP or single-process run), so without
    DeepSpeed the DDP / FSDP1 wrappers are stripped here (FSDP2 and plain models are
    not wrapped)."""
    if engine.deepspeed:
        return accelerator.unwrap_model(model)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, FullyShardedDataParallel)):
        model = model.module
    return model


def inference_model(engine: Engine, accelerator, model):
    """The module to run forward passes on outside training (evaluation, generation): the bare
    model, except under FSDP1, whose root wrapper gathers the parameters it owns (the
    embeddings, the head) around each forward."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1 = model
    while hasattr(fsdp1, "module") and not isinstance(fsdp1, FullyShardedDataParallel):
        fsdp1 = fsdp1.module
    return fsdp1 if isinstance(fsdp1, FullyShardedDataParallel) else unwrap(engine, accelerator, model)


def prepare(engine: Engine, accelerator, model, optimizer, *rest):
    """accelerator.prepare; for FSDP2 after choosing its wrap units (fsdp2_wrap_units) and giving
    meta-device parameters storage (fsdp2_storage_for_meta)."""
    if engine.fsdp2:
        fsdp2_wrap_units(accelerator.state.fsdp_plugin, model)
        fsdp2_storage_for_meta(model, optimizer)
    return accelerator.prepare(model, optimizer, *rest)


def fsdp2_on_cpu(accelerator, launch: "LaunchConfig", precision: str, has_gpu: bool) -> None:
    """An FSDP launch on a host without a GPU: cpu_fsdp2 (accelerate would run it as DDP)."""
    from launcher import distributed

    if launch.distributed_type == distributed.FSDP and not has_gpu:
        cpu_fsdp2(accelerator, precision)


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


