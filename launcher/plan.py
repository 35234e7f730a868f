"""`launcher plan`: what a launch will do, computed without starting any process group.

World size, batch arithmetic, steps, each DeepSpeed "auto" and what fills it, a
per-GPU memory estimate for model states under each ZeRO stage, and the exact
commands to run it. It validates the run config, accelerate YAML and DeepSpeed
JSON together first, so it doubles as a pre-flight check (exit 2 on a contradiction).

Memory for model states follows the ZeRO paper (Rajbhandari et al., 2020, sec. 3/5):
with mixed precision and Adam a parameter costs 2 bytes (16-bit weights) + 2 (16-bit
gradients) + 12 (fp32 master weights, momentum, variance); in full fp32 it costs
4 + 4 + 8 (no master copy). Over N data-parallel ranks, stage 1 divides the
optimizer states by N, stage 2 also the gradients, stage 3 also the weights.
Activations, buffers and fragmentation come on top and are not estimated.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from launcher import distributed, engines
from launcher.config import RunConfig
from launcher.errors import DataError

from launcher.sizing import checkpoint_bytes
from launcher.sizing import human_bytes as _size


@dataclass
class BytesPerParam:
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def unsharded_bytes(stage: int, sixteen_bit: bool, fp32_grad_partitions: bool = False) -> BytesPerParam:
    """Bytes per parameter of each model state before a ZeRO stage divides it by the world
    size: 16-bit weights and gradients with fp32 masters and Adam's m, v (2 + 2 + 12), or
    all in fp32 (4 + 4 + 8). fp32_grad_partitions: ZeRO-2/3 with 16-bit weights sum each
    rank's gradient partition in fp32 (data_types.grad_accum_dtype), 4 bytes rather than 2."""
    p, g, o = (2.0, 2.0, 12.0) if sixteen_bit else (4.0, 4.0, 8.0)
    if stage >= 2 and fp32_grad_partitions:
        g = 4.0
    return BytesPerParam(p, g, o)


def bytes_per_param(stage: int, world: int, sixteen_bit: bool, offload_optimizer: bool = False,
                    offload_params: bool = False, fp32_grad_partitions: bool = False) -> tuple[BytesPerParam, BytesPerParam]:
    """(on each GPU, in host memory) bytes per parameter for one rank's model states: ZeRO-1
    divides the optimizer states, ZeRO-2 the gradients too, ZeRO-3 the weights too."""
    full = unsharded_bytes(stage, sixteen_bit, fp32_grad_partitions)
    p, g, o = full.params, full.grads, full.optimizer
    if stage >= 1:
        o /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        p /= world
    host = BytesPerParam(0.0, 0.0, 0.0)
    if offload_optimizer:
        host.optimizer, o = o, 0.0
    if offload_params:
        host.params, p = p, 0.0
    return BytesPerParam(p, g, o), host


def _fmt_frac(full: float, stage_divides: bool, world: int) -> str:
    return f"{full:g}/{world}" if stage_divides and world > 1 else f"{full:g}"


def memory_lines(n_params: int | None, stage: int, world: int, sixteen_bit: bool, offload_optimizer: bool,
                 offload_params: bool, engine: str, fp32_grad_partitions: bool = False) -> list[str]:
    fp32_grads = fp32_grad_partitions and sixteen_bit
    kind = ("16-bit weights and grads, fp32 master + Adam m, v" if sixteen_bit
            else "fp32 weights, grads and Adam m, v")
    if fp32_grads:
        kind += "; stages 2 and 3 sum their gradient partition in fp32"
    ddp = unsharded_bytes(0, sixteen_bit)
    lines = [f"bytes per parameter ({kind}): params {ddp.params:g} + grads {ddp.grads:g} + optimizer {ddp.optimizer:g} "
             f"= {ddp.total:g}",
             f"  {'stage':<10}{'params':>8}{'grads':>8}{'optim':>8}{'B/param':>9}{'per GPU':>12}"]
    for s in range(4):
        here, _ = bytes_per_param(s, world, sixteen_bit, fp32_grad_partitions=fp32_grads)
        full = unsharded_bytes(s, sixteen_bit, fp32_grads)
        size = _size(n_params * here.total) if n_params else "?"
        mark = "  <- this run" if s == stage else ""
        name = f"{s} (DDP)" if s == 0 else str(s)
        lines.append(f"  {name:<10}{_fmt_frac(full.params, s >= 3, world):>8}{_fmt_frac(full.grads, s >= 2, world):>8}"
                     f"{_fmt_frac(full.optimizer, s >= 1, world):>8}{here.total:>9.3g}{size:>12}{mark}")
    here, host = bytes_per_param(stage, world, sixteen_bit, offload_optimizer, offload_params, fp32_grads)
    if n_params:
        lines.append(
            f"this run ({engine}): {n_params:,} params x {here.total:.3g} B = {_size(n_params * here.total)} "
            f"per GPU for model states"
            + (f", {_size(n_params * host.total)} per rank in host memory (offload)" if host.total else "")
        )
    else:
        lines.append("this run: parameter count unknown, so no totals (see 'model' above)")
    lines.append("not included: buffers, fragmentation (activations: below)")
    return lines


@dataclass(frozen=True)
class LoraCount:
    """What a LoRA run's wrapped model holds: the parameters that train (adapters and
    modules_to_save), those that stay frozen, and the weights bitsandbytes would quantize."""
    trainable: int
    frozen: int
    quantized: int


def lora_trainable(cfg: RunConfig) -> LoraCount | None:
    """Counted on the model built on the meta device and wrapped by peft exactly as training
    wraps it. None when the model config cannot be read offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from launcher import models, tasks
    from launcher.tasks import lora

    task = tasks.for_config(cfg)
    n, _ = task.count_parameters()
    config = getattr(task, "model_config", None)
    if n is None or config is None:
        return None
    auto = AutoModelForCausalLM if cfg.task == "causal_lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        base = models.from_config(auto, config)  # pooled as the config records (count_parameters)
        # What bitsandbytes quantizes: every linear layer's weight but the output head's.
        quantized = sum(m.weight.numel() for m in base.modules()
                        if isinstance(m, torch.nn.Linear) and m is not base.get_output_embeddings())
        model = lora.apply(base, cfg.model.lora, task.name)
    return LoraCount(trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                     frozen=sum(p.numel() for p in model.parameters() if not p.requires_grad), quantized=quantized)


# Bytes per quantized weight: NF4 packs two per byte plus one 8-bit absmax per block of 64
# (double quantization), and one fp32 scale per 256 of those; int8, one byte (its per-row
# fp32 scales are negligible).
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}


def lora_memory_lines(n_params: int, n_train: int, base_dtype: str, stage: int, world: int, sixteen_bit: bool,
                      engine: str, quantization: str = "none", n_quantized: int = 0, n_frozen: int | None = None) -> list[str]:
    """Model states of a LoRA run: the frozen base in its dtype (no gradients, no optimizer
    state), and the trained part in fp32 with gradients and AdamW moments (plus the engine's
    fp32 master copy under 16-bit DeepSpeed). ZeRO divides as for full training. A quantized
    base (one process) holds its linear weights at QUANTIZED_BYTES and the rest of the frozen
    parameters in fp32 (peft's prepare_model_for_kbit_training upcasts them). n_frozen: the
    wrapped model's frozen count (adapters are parameters the base lacks); else n_params -
    n_train."""
    frozen = n_params - n_train if n_frozen is None else n_frozen
    base_bytes = 2.0 if base_dtype == "bfloat16" else 4.0
    here, _ = bytes_per_param(stage, world, False)  # trained weights stay fp32: 4 + 4 + 8
    master = (4.0 / world if stage >= 1 else 4.0) if sixteen_bit else 0.0
    base_here = base_bytes / world if stage >= 3 else base_bytes
    trained = here.total + master
    if quantization != "none":
        q, rest = QUANTIZED_BYTES[quantization], frozen - n_quantized
        base_total = n_quantized * q + rest * 4.0
        base_line = [f"frozen base {n_quantized:>15,} x {q:.3g} B ({quantization}) = {_size(n_quantized * q)}",
                     f"  and       {rest:>15,} x 4 B (fp32: embeddings, norms, head) = {_size(rest * 4.0)}"]
    else:
        base_total = frozen * base_here
        base_line = [f"frozen base {frozen:>15,} x {base_here:.3g} B ({base_dtype}"
                     f"{f' / {world} ranks' if stage >= 3 and world > 1 else ''}) = {_size(base_total)}"]
    lines = [*base_line,
             f"trained     {n_train:>15,} x {trained:.3g} B (fp32 weights {here.params:g} + grads {here.grads:g} + "
             f"AdamW {here.optimizer:g}{f' + master {master:g}' if master else ''}) = {_size(n_train * trained)}",
             f"this run ({engine}): {_size(base_total + n_train * trained)} per GPU for model states",
             "not included: buffers, fragmentation (activations: below)"]
    return lines


def activation_lines(config, cfg: RunConfig) -> list[str]:
    """Activation and logits memory of one micro-batch on one GPU, with and without activation
    checkpointing. Per layer, 16-bit activations take s*b*h*(34 + 5*a*s/h) bytes (Korthikanti
    et al. 2022, eq. 1, no tensor parallelism); the 5*a*s/h term is the attention score
    matrix, which only eager attention keeps (sdpa and flash attention recompute it).
    Checkpointing keeps each layer's input (2*s*b*h bytes) plus one layer being recomputed.
    A causal LM's loss also holds float32 logits and the log-probabilities it saves for the
    backward pass: 2 x 4 bytes per token and vocabulary entry, for every token of the
    micro-batch, or for one chunk of train.loss_chunk_tokens under the chunked loss."""
    if config is None:
        return ["activations unknown: no model config"]
    h = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not (h and n_layers and heads):
        return ["activations unknown: the model config names no hidden size / layers / heads"]
    t = cfg.train
    b, s = t.micro_batch_size, cfg.data.max_length
    scale = 1.0 if t.precision in ("bf16", "fp16") else 2.0  # fp32 activations take twice the bytes
    eager = cfg.model.attn_implementation == "eager"
    per_layer = s * b * h * (34 + (5 * heads * s / h if eager else 0)) * scale
    full, ckpt = n_layers * per_layer, n_layers * 2 * s * b * h * scale + per_layer
    on = "on" if t.gradient_checkpointing else "off"
    out = [f"activations per micro-batch ({b} x {s} tokens, {n_layers} layers, hidden {h}): {_size(full)} without "
           f"checkpointing, {_size(ckpt)} with it (train.gradient_checkpointing is {on})"]
    if cfg.task == "causal_lm":
        vocab = getattr(config, "vocab_size", 0) or 0
        whole = _size(2 * 4 * b * s * vocab)
        chunk = min(t.loss_chunk_tokens, b * s)
        lora = cfg.model.lora
        # peft wraps a head it trains whole, and the run turns the chunked loss off (lean_loss.head_problem)
        wrapped = lora.enabled and bool(set(lora.modules_to_save or []) & {"lm_head", "embed_out", "output"})
        if chunk and wrapped:
            out.append(f"logits     {whole} per micro-batch (float32 logits and log-probabilities, vocabulary {vocab:,}; "
                       "the chunked loss is off: model.lora.modules_to_save wraps the output head, not a plain linear layer)")
        elif chunk:  # the chunked loss: only this many tokens' logits exist at once
            out.append(f"logits     {_size(2 * 4 * chunk * vocab)} per chunk of {chunk} response tokens "
                       f"(train.loss_chunk_tokens; float32 logits and log-probabilities, vocabulary {vocab:,}); "
                       f"the model's own loss (0, or the fallback) holds {whole} per micro-batch")
        else:
            out.append(f"logits     {whole} per micro-batch (float32 logits and log-probabilities, vocabulary {vocab:,}; "
                       "train.loss_chunk_tokens is 0)")
    out.append("           moved by train.micro_batch_size, data.max_length, train.gradient_checkpointing, "
               "model.attn_implementation (eager keeps attention scores)")
    return ["memory     " + out[0]] + ["           " + x if not x.startswith(" ") else x for x in out[1:]]


def launch_commands(config_path: str, overrides: list[str], accelerate_config: str | None, launch,
                    checkpoint_bytes: float | None = None, run_dir: dict | None = None) -> list[str]:
    """`run_dir`: --output-dir and --run-name as given (None: not given); slurm/train.sh takes
    them as OUTPUT_DIR and RUN_NAME (its stop directory goes beside the runs)."""
    given = {k: v for k, v in (run_dir or {}).items() if v}
    flags = [x for k, v in given.items() for x in (f"--{k.replace('_', '-')}", v)]
    args = [*flags, *overrides]
    tail = ["-m", "launcher", "train", config_path, *args]
    if accelerate_config is None and launch.num_processes == 1:
        return [shlex.join(["launcher", "train", config_path, *args])]
    cmd = ["accelerate", "launch"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    else:
        cmd += ["--multi_gpu"]
    cmd += ["--num_machines", str(launch.num_machines), "--num_processes", str(launch.num_processes)]
    if launch.num_machines > 1:
        cmd += ["--machine_rank", "NODE_RANK", "--main_process_ip", "HEAD_NODE", "--main_process_port", "29500"]
    out = [shlex.join(cmd + tail).replace("NODE_RANK", "$NODE_RANK").replace("HEAD_NODE", "$HEAD_NODE")]
    if accelerate_config:  # the same launch, checked in one process first
        one = ["launcher", "train", config_path, "--accelerate-config", accelerate_config,
               "--num-processes", str(launch.num_processes)]
        if launch.num_machines > 1:
            one += ["--nodes", str(launch.num_machines), "--machine-rank", "NODE_RANK", "--main-process-ip", "HEAD_NODE"]
        out.append(shlex.join(one + args).replace("NODE_RANK", "$NODE_RANK").replace("HEAD_NODE", "$HEAD_NODE"))
    if launch.num_machines > 1:
        out.append(f"  (on every node; NODE_RANK 0..{launch.num_machines - 1}, HEAD_NODE = address of node 0)")
    if Path("slurm/train.sh").is_file():
        # Slurm allocates the GPUs; the script then runs one process per GPU it was given.
        env = {"ACCELERATE_CONFIG": accelerate_config} if accelerate_config else {}
        env.update({k.upper(): v for k, v in given.items()})
        # NAME='a b' (a quoted NAME=... is a command name to the shell, not an assignment)
        out.append(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join([
            "sbatch", "--nodes", str(launch.num_machines), "--gpus-per-node", str(launch.processes_per_machine),
            "slurm/train.sh", config_path, *overrides])]))
        lead = os.environ.get("SIGNAL_LEAD_S", "600")
        size = f" (a checkpoint is about {_size(checkpoint_bytes)})" if checkpoint_bytes else ""
        out.append(f"  (whole nodes, every CPU to the node's ranks: CPUS_PER_NODE overrides; every rank checkpoints "
                   f"and stops SIGNAL_LEAD_S={lead} s before the time limit{size})")
    return out


def _write_s(n_bytes: float, nodes: int) -> str:
    from launcher.preemption import PLAN_WRITE_BYTES_PER_S

    seconds = n_bytes / (PLAN_WRITE_BYTES_PER_S * max(nodes, 1))
    return f"{seconds:,.{1 if seconds < 10 else 0}f} s at {PLAN_WRITE_BYTES_PER_S / 1e9:.0f} GB/s per node (assumed)"


def _export_dtype(cfg: RunConfig, model_config) -> str:
    """checkpoint.export_dtype as the run resolves it (auto: the dtype config.json declares)."""
    from launcher import models

    declared = None
    if cfg.model.name != "tiny" and model_config is not None:
        get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k, None)
        declared = get("dtype") or get("torch_dtype")
    return models.export_dtype(cfg.checkpoint.export_dtype, declared)


def _best_lines(cfg: RunConfig, model_config, n_params: int, sixteen: bool, nodes: int) -> list[str]:
    """checkpoint.export: best: what an improving evaluation writes."""
    if cfg.checkpoint.export != "best" or cfg.eval.every_steps <= 0:
        return []
    dtype = _export_dtype(cfg, model_config)
    trained = {"bf16": "bfloat16", "fp16": "float16"}[cfg.train.precision] if sixteen else None
    lora = cfg.model.lora.enabled
    if trained and dtype != trained and not lora:
        return [f"best       a full checkpoint at each improving evaluation (checkpoint.export: best): the {dtype} "
                f"export is read from DeepSpeed's fp32 masters, which only a checkpoint holds"]
    if lora and cfg.model.name != "tiny":
        return ["best       a checkpoint at each improving evaluation (checkpoint.export: best): LoRA's checkpoint of "
                "what trains is smaller than the merged model"]
    # (a LoRA run on a random tiny base also writes adapter/ and base/ beside the merged model)
    size = n_params * {"float32": 4, "bfloat16": 2, "float16": 2}[dtype] * (2 if lora else 1)
    return [f"best       about {_size(size)} at each improving evaluation (checkpoint.export: best): its weights only, in "
            f"{dtype}, replaced when beaten, ~{_write_s(size, 1)} from rank 0"]


def _memory_section(cfg: RunConfig, launch: "distributed.LaunchConfig", ds: dict, n_params: int | None,
                    lora_count: LoraCount | None, stage: int, sixteen: bool, engine: str) -> list[str]:
    """Per-GPU model-state memory: a LoRA run's frozen base and trained part, or every ZeRO
    stage's split of a full run (with the launch's CPU offload)."""
    world = launch.num_processes
    fp32_grads = str(distributed._get(ds, "data_types.grad_accum_dtype", "")).lower() in ("fp32", "float32")
    offload_opt = str(distributed._get(ds, "zero_optimization.offload_optimizer.device", "none")).lower() != "none"
    offload_par = str(distributed._get(ds, "zero_optimization.offload_param.device", "none")).lower() != "none"
    offloaded = [name for name, on in (("optimizer", offload_opt), ("params", offload_par)) if on]
    if offloaded:
        engine += f" + CPU offload of {' and '.join(offloaded)}"
    if lora_count and lora_count.trainable and n_params:
        n_train = lora_count.trainable
        wrapped = n_train + lora_count.frozen  # (as the run counts them: the base, its adapters and copies)
        head = (f"memory     per GPU, model states only (LoRA: {n_train:,} of {wrapped:,} parameters train, "
                f"{n_train / wrapped:.2%}):")
        body = lora_memory_lines(n_params, n_train, engines.weight_dtype(cfg.train, cfg.model, launch), stage, world, sixteen, engine,
                                 cfg.model.quantization, lora_count.quantized, lora_count.frozen)
    else:
        head = "memory     per GPU, model states only:"
        body = memory_lines(n_params, stage, world, sixteen, offload_opt, offload_par, engine, fp32_grads)
    return [head] + ["             " + x for x in body]


def _steps_line(cfg: RunConfig) -> str:
    """Rows, steps per epoch and optimizer steps, from the data's row count when it can be had."""
    from launcher import sizing

    t = cfg.train
    rows, source = sizing.count_rows(cfg.task, cfg.data)
    if rows is None:
        return f"steps      {('max_steps ' + str(t.max_steps)) if t.max_steps else 'unknown'}: {source}"
    if rows < t.global_batch_size and not (cfg.task == "causal_lm" and cfg.data.packing):  # as training refuses it
        raise DataError(f"{source}: {rows} rows is fewer than train.global_batch_size ({t.global_batch_size})")
    per_epoch = rows // t.global_batch_size
    total = t.max_steps or t.epochs * per_epoch
    how = f"max_steps {t.max_steps}" if t.max_steps else f"{t.epochs} epochs"
    return (f"steps      {rows:,} rows ({source}) / {t.global_batch_size} = {per_epoch:,} steps per epoch; "
            f"{how} -> {total:,} optimizer steps")


def _model_size(cfg: RunConfig) -> tuple[int | None, str, object | None]:
    """(parameter count or None, where it comes from or why it is unknown, the model config)."""
    from launcher import hub, sizing

    facts = sizing.model_facts(cfg)  # config.json arithmetic; no torch import
    if facts is not None:
        return facts
    if (problem := hub.fetch_config(cfg.model)) is not None:  # a hub model that cannot be had: no retries
        return None, problem, None
    # Another family: build it on the meta device (exact, but imports torch + transformers).
    from launcher import tasks

    task = tasks.for_config(cfg)
    n_params, where = task.count_parameters()
    return n_params, where, getattr(task, "model_config", None)


def _shown(path: Path) -> str:
    """A path under the current directory as relative to it (config.yaml records it absolute)."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def resume_line(cfg: RunConfig) -> str:
    """Where the run would start, as `launcher train` decides it (read only): a new run, the
    run directory's latest checkpoint, a restart in place, or another run's checkpoint, with
    the accepted config changes; ConfigError (one line) for what train would refuse (an
    existing directory under checkpoint.resume=never, a change that makes another run)."""
    from launcher import checkpoint as ckpt_lib
    from launcher import config_changes, owner

    job = os.environ.get("SLURM_JOB_ID") or None  # (runtime.job_id: inside an allocation, as train sees it)
    try:
        start = ckpt_lib.resolve_resume(cfg.run_dir, cfg.checkpoint.resume, job, cfg.checkpoint.trust)
        step = ckpt_lib.TrainState.read(start.checkpoint).step if start.checkpoint is not None else 0
    except (OSError, ValueError) as e:  # (another user's run, a damaged state file): train says more
        return f"resume     unknown: {cfg.run_dir} cannot be read ({type(e).__name__}: {e})"
    if start.checkpoint is not None:
        forked = start.forked_from is not None
        changed = config_changes.check_resume(cfg, start.checkpoint, forked=forked)
        what = (f"a new run from another run's {start.checkpoint} (step {step})" if forked
                else f"{_shown(cfg.run_dir)} exists: goes on from {start.checkpoint.name} (step {step})")
        if cfg.train.max_steps and step >= cfg.train.max_steps:
            what += f", at or past train.max_steps ({cfg.train.max_steps}): nothing more trains"
    elif start.interrupted or start.restart_of_job:
        how = start.ended() if start.interrupted else f"of job {start.restart_of_job} stopped before its first checkpoint"
        changed = config_changes.check_restart(cfg, how)
        what = f"{_shown(cfg.run_dir)} exists: starts again at step 0 in place (its last attempt {how})"
    else:
        return f"resume     none: a new run in {_shown(cfg.run_dir)}"
    holder, dead = owner.lease_holder(cfg.run_dir, job) if cfg.run_dir.is_dir() else (None, False)
    busy = (f"; in use now by another launch (host {holder.get('host')}, pid {holder.get('pid')}): train refuses while "
            "it runs" if holder is not None and not dead else "")
    return f"resume     {what}" + (f"; config changes: {', '.join(changed)}" if changed else "") + busy


def plan(cfg: RunConfig, config_path: str, overrides: list[str], accelerate_config: str | None,
         launch: "distributed.LaunchConfig", run_dir: dict | None = None, resume: str | None = None) -> str:
    t = cfg.train
    world = launch.num_processes
    accumulation = t.global_batch_size // (t.micro_batch_size * world)
    planned = engines.planned(launch, t.precision)
    stage, engine = planned.shard_stage, planned.label
    lines = [f"run        {config_path}  ({cfg.task}, model {cfg.model.name}, precision {t.precision})",
             f"launch     {accelerate_config or 'no accelerate config'}: {engine}, "
             f"{launch.num_machines} node(s) x {launch.processes_per_machine} process(es) = world size {world}",
             f"batch      global {t.global_batch_size} = micro {t.micro_batch_size} x accumulation {accumulation} "
             f"x {world} process(es)"]
    lines.append(_steps_line(cfg))
    if resume:
        lines.append(resume)
    ds, fills = engines.deepspeed_config(cfg.train, launch) if launch.uses_deepspeed else ({}, [])
    if launch.uses_deepspeed:
        lines.append(f"deepspeed  {launch.ds_source}, \"auto\" resolved:")
        width = max(len(k) for k, _, _ in fills) if fills else 0
        for key, value, owner in fills:
            shown = "auto" if value == distributed.AUTO else str(value).lower() if isinstance(value, bool) else value
            lines.append(f"             {key:<{width}} = {shown}  ({owner})")
    n_params, where, model_config = _model_size(cfg)
    lines.append(f"model      {n_params:,} parameters ({where})" if n_params else f"model      parameters unknown: {where}")
    sixteen = planned.sixteen_bit_copy
    lora_count = lora_trainable(cfg) if cfg.model.lora.enabled and n_params else None
    n_train = lora_count.trainable if lora_count else None
    lines += _memory_section(cfg, launch, ds, n_params, lora_count, stage, sixteen, engine)
    lines += activation_lines(model_config, cfg)
    ckpt = None
    if n_params:
        trainable_only = bool(n_train) and cfg.model.name != "tiny"  # a random tiny base is saved whole
        saved = n_train if trainable_only and n_train else n_params
        ckpt = checkpoint_bytes(saved, n_train or n_params, 4 if trainable_only or not sixteen else 2)
        what = ("LoRA on a pretrained base: the trained weights (adapters, heads) and their AdamW state; the frozen "
                "base is read again from model.name" if trainable_only else "every weight and the AdamW state of what trains")
        lines.append(f"checkpoint about {_size(ckpt)} per save ({what}), ~{_write_s(ckpt, launch.num_machines)} to write")
        lines += _best_lines(cfg, model_config, n_params, sixteen, launch.num_machines)
        if world > 1:
            from launcher import preemption

            lines += preemption.plan_line(ckpt, launch.num_machines).split("\n")
    lines.append("command")
    lines += ["  " + c for c in launch_commands(config_path, overrides, accelerate_config, launch, ckpt, run_dir)]
    return "\n".join(lines)
