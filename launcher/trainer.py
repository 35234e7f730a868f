"""The training entry, readable top to bottom: `train` checks, sets up, steps, finishes.

- `preflight`: everything that can refuse the run, on every rank, before anything is written.
- `open_run`, `build`, `start_tracker`: the run directory, then the pieces (`Parts`: data,
  model, optimizer, scheduler, sampler, checkpointer, resumed state), then the tracker run.
- `Trainer.run`: the steps. `Trainer.train_step` is one token-exact optimizer step; the
  `Schedule` says what is due after it (log, evaluate, halt, checkpoint); `Window` is the
  logging window.
- `Trainer.finish`: the best weights, the decision threshold, the export, the summary.

It names no backend and holds no rank checks: the runtime decides who prints and which ranks
exist, the tracker decides who logs, the checkpointer decides when to save. Every rank runs
every line here, so every collective (save_state, the export gather, metric reduction) is
reached by all of them; each method below says which of its lines are collectives.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import launcher
from launcher import checkpoint as ckpt_lib
from launcher import (config_changes, faults, hub, models, owner, preemption, report, schedules, sizing, tasks, tracking,
                      watchdog)
from launcher.config import LOWER_IS_BETTER, RunConfig, dump_yaml, flatten, redact_uri, to_dict, unused_lora
from launcher.data import batching
from launcher.errors import ConfigError, DataError
from launcher.files import write_atomically
from launcher.preemption import INTERRUPTED
from launcher.runtime import build_runtime, resolve_launch
from launcher.tasks import modeling

# The test suite (LAUNCHER_TESTING=1) checks every step's item count against an all-reduce.
CHECK_ITEMS = os.environ.get("LAUNCHER_TESTING") == "1"


def train(cfg: RunConfig) -> dict:
    """`launcher train` on every rank: the run's summary (status, step, run directory, metrics)."""
    cfg, launch, notes = resolve_launch(cfg)  # adopted values first: the task is built from the run's own config
    task = tasks.for_config(cfg)
    rt = build_runtime(cfg.train, cfg.model, launch, notes)
    rt.watch_signals()  # from here SIGTERM, SIGUSR1, SIGINT mean: checkpoint at the end of the step, then exit
    pre = preflight(cfg, rt, task)
    run_dir, warm_tracker = open_run(cfg, rt, pre)
    parts = build(cfg, rt, task, pre, run_dir)
    patience, waited = cfg.eval.early_stopping_patience, parts.state.evals_without_improvement
    stopped_early = 0 < patience <= waited
    if (parts.state.step >= parts.total_steps or stopped_early) and _exported_at(run_dir, rt) == parts.state.step:
        dropped = rt.on_main(_close_abandoned, cfg, parts, warm_tracker)
        rt.print(f"{run_dir} already finished at step {parts.state.step}; nothing to do"
                 + ("; the changes above are not recorded (nothing follows them)" if pre.changed else "")
                 + (dropped or ""))
        more = ("eval.early_stopping_patience" if stopped_early else
                "train.max_steps" if cfg.train.max_steps else "train.epochs")  # (max_steps set: epochs move nothing)
        rt.print(f"to train on from there, raise {more}; to start again, give another --run-name")
        return {"status": "already_finished", "step": parts.state.step, "run_dir": str(run_dir)}
    if pre.resumed is not None or pre.changed:  # (a restart from step 0 in place: no checkpoint read)
        rt.on_main(config_changes.record, run_dir, pre.resumed.step if pre.resumed else 0, pre.changed, cfg)
    tracker = start_tracker(cfg, parts, pre, warm_tracker)
    with tracker:  # on any exception: the stacks kept first (the dog exits first), then the tracker run FAILED
        trainer = Trainer(cfg, parts, tracker)
        with trainer.dog:
            stop = "early_stop" if stopped_early else trainer.run()  # (killed before its export: that, now)
            if stop in ("halt", "signal"):
                return trainer.stopped(stop)
            return trainer.finish(stop)


def _close_abandoned(cfg: RunConfig, p: Parts, warm) -> str:
    """A finished run's later attempt that was abandoned (extended, killed before its first
    checkpoint, then given the old max_steps again) may have left its steps in metrics.jsonl
    and left its MLflow run RUNNING: the records past the export go, as at any resume, and
    the tracker run ends FINISHED. Its points past the export stay in the tracker run (neither
    MLflow nor W&B deletes a point): the run is tagged launcher.abandoned_steps, and the
    closing line says so. Returns the note for the closing line."""
    jsonl = p.run_dir / "metrics.jsonl"
    past = sorted({r["step"] for r in tracking.read_metrics(jsonl) if r["step"] > p.state.step}) if jsonl.is_file() else []
    ids = {**p.state.tracker_ids, **(owner.read_owner(p.run_dir).get("tracker_ids") or {})}
    setup = tracking.Setup.of(cfg)
    running = tracking.left_running(setup, ids)
    if not past and not running:
        return ""
    tracker = tracking.start_tracking(setup, True, p.rt.facts(), p.run_dir, ids, p.state.step, warm)
    steps = "" if not past else f"step {past[0]}" if len(past) == 1 else f"steps {past[0]}-{past[-1]}"
    if past:
        tracker.log_outcome({"launcher.abandoned_steps": steps.split(" ")[1]})
    tracker.finish()
    said = []
    if past:
        said.append(f"the records of an abandoned attempt past it ({steps}) are dropped from metrics.jsonl")
    if running or (past and (setup.section.mlflow or setup.section.wandb)):
        said.append("its tracker run, left running, is closed" if not past else
                    "its tracker run is closed, its points tagged launcher.abandoned_steps")
    return "; " + " and ".join(said)


def _exported_at(run_dir: Path, rt) -> int | None:
    """The step whose end wrote model/ and final_metrics.json (rank 0 reads; every rank follows)."""
    step = None
    if rt.is_main and (run_dir / "model").is_dir():
        try:
            step = json.loads((run_dir / "final_metrics.json").read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return rt.gather_objects(step)[0]


# ---- setup: checks, run directory, pieces, tracker


@dataclass
class Preflight:
    """What every rank checked before any rank wrote anything."""

    start: ckpt_lib.Start
    changed: dict  # accepted config changes of a resume: key -> (was, now)
    resumed: ckpt_lib.TrainState | None
    moved: str | None  # a full state resumed on another number of ranks: the line saying so
    cache: Any
    fetched_here: bool | None  # None: not a hub model
    data: tuple | None  # (tokenizer, train rows, validation rows); None for synthetic data


def preflight(cfg: RunConfig, rt, task) -> Preflight:
    """Everything that can refuse the run, each in one line, before anything is written: the
    resume (another run's config, another engine), a full disk, the model source, a tracker
    that cannot be reached, a data row that cannot load. Ends with a barrier: every rank has
    decided before rank 0 creates anything."""
    start = ckpt_lib.agreed_start(
        lambda: ckpt_lib.resolve_resume(cfg.run_dir, cfg.checkpoint.resume, rt.job_id, cfg.checkpoint.trust),
        rt.gather_objects, rt.print)
    how = start.ended() if start.interrupted else f"of job {start.restart_of_job} stopped before its first checkpoint"
    changed = config_changes.check_restart(cfg, how) if start.interrupted or start.restart_of_job else {}
    changed |= config_changes.check_resume(cfg, start.checkpoint, forked=start.forked_from is not None)
    resumed = ckpt_lib.TrainState.read(start.checkpoint) if start.checkpoint is not None else None
    moved = ckpt_lib.check_layout(start.checkpoint, resumed, rt) if start.checkpoint and resumed else None
    ckpt_lib.check_writable(Path(cfg.output_dir))  # every rank: each writes its part of a checkpoint
    cache = rt.data_cache(Path(cfg.data.cache_dir or Path(cfg.output_dir) / ".cache"), cfg.data.cache_shared)
    if start.checkpoint is not None:  # the LoRA base is read again
        _check_base(cfg, start.checkpoint, rt)
    fetched_here = hub.resolve(cfg.model, rt, cache)  # a hub model or GGUF file: once per node, then offline
    task.check_model_source()
    modeling.attn_implementation(cfg.model, cfg.train.precision)  # a kernel this precision and host can run
    tracking.check_reachable(tracking.Setup.of(cfg))  # every rank: they must agree to stop
    data = None  # synthetic data is generated into the run directory, so it is read once that exists
    if not cfg.data.synthetic.enabled:
        data = _prepare_data(task, cache, _tokenizer_dir(cfg.run_dir, start),
                             *task.sources(cfg.data.train_file, cfg.data.validation_file))
        if start.checkpoint is not None and resumed is not None and start.forked_from is None \
                and cfg.checkpoint.resume_changed != "allow":
            _check_rows(cfg.data, task.train_examples(data[1]), len(data[2]), resumed, start.checkpoint)
    rt.barrier()
    return Preflight(start, changed, resumed, moved, cache, fetched_here, data)


def _check_rows(data, rows: int, val_rows: int, resumed: ckpt_lib.TrainState, checkpoint: Path) -> None:
    """A resume reads the data files again: a training file changed in place (rows added or
    removed, under the same name) would shift every later batch; a validation file, score the
    later evaluations on other clauses than the earlier ones they are compared with (the best
    checkpoint, early stopping). ConfigError unless allowed."""
    if resumed.train_rows is not None and rows != resumed.train_rows:
        raise ConfigError(f"data.train_file: {data.train_file} gives {rows:,} training examples now and gave "
                          f"{resumed.train_rows:,} when {checkpoint.name} was written: it changed in place, and the resumed "
                          "epochs would skip or repeat rows; restore it, or set checkpoint.resume_changed=allow to go on "
                          "with the new rows")
    if resumed.validation_rows is not None and val_rows != resumed.validation_rows:
        raise ConfigError(f"data.validation_file: {data.validation_file} gives {val_rows:,} validation rows now and gave "
                          f"{resumed.validation_rows:,} when {checkpoint.name} was written: it changed in place, and later "
                          "evaluations would be compared with earlier ones on other rows (the best checkpoint, early "
                          "stopping); restore it, or set checkpoint.resume_changed=allow to go on with the new rows")


def open_run(cfg: RunConfig, rt, pre: Preflight):
    """The run directory taken (rank 0 writes config.yaml and the owner record of a new run),
    what a killed attempt left half-written removed, and the resume announced. Returns the
    directory and the tracker's warm-up, which overlaps the model load."""
    start = pre.start
    run_dir = _prepare_run_dir(cfg, rt, start)
    rt.preemption.run_dir = run_dir  # from here a second Ctrl-C before a checkpoint marks it
    if pre.resumed is not None:
        rt.preemption.saved(pre.resumed.step)  # (the resumed checkpoint counts, loaded or not yet)
    warm_tracker = tracking.warm_up(tracking.Setup.of(cfg), rt.is_main)
    engine = "" if rt.distributed_type == "NO" else f"{rt.distributed_type}, "  # (accelerate's name for one process)
    rt.print(f"run directory: {run_dir}  ({rt.world_size} process(es) on {rt.num_nodes} node(s), {engine}{rt.device})")
    for note in rt.notes or []:
        rt.print(note)
    if config_changes.same_path(cfg.data.train_file, cfg.data.validation_file):  # (accepted without a word)
        rt.print(f"note: data.validation_file is data.train_file ({cfg.data.train_file}): the evaluations score rows "
                 "the model trains on, which says little of how it does on new ones")
    if unused := unused_lora(cfg.model.lora):
        rt.print(f"note: model.lora.enabled is false: model.lora.{', '.join(unused)} set but unused; every weight trains "
                 "(model.lora.enabled=true trains adapters)")
    if start.partial:
        rt.print(f"ignoring what a killed attempt left half-written: {', '.join(p.name for p in start.partial)} "
                 "(never loaded); removed")
        rt.on_main(ckpt_lib.remove_partial, start.partial)
    if start.checkpoint is not None and pre.resumed is not None:
        rt.print(f"resuming from {start.checkpoint}")
        if start.forked_from is not None:
            rt.print("  another run's checkpoint: this is a new run (its own config.yaml and tracker run); that run is "
                     "left as it is")
        if pre.moved:
            rt.print(pre.moved)
        for line in config_changes.lines(pre.changed):
            rt.print(line)
    if start.restart_of_job:
        rt.print(f"restarting from step 0 in place: an earlier attempt of job {start.restart_of_job} "
                 "stopped before its first checkpoint")
    if start.interrupted:
        rt.print(f"restarting from step 0 in place: the last attempt {start.ended()}")
    if start.restart_of_job or start.interrupted:
        for line in config_changes.lines(pre.changed, "restarting"):
            rt.print(line)
    return run_dir, warm_tracker


@dataclass
class Parts:
    """What `build` made; the Trainer's pieces."""

    rt: Any
    task: Any
    run_dir: Path
    tokenizer: Any
    train_ds: Any
    val_ds: Any
    model: Any
    optimizer: Any
    scheduler: Any
    sampler: batching.StepSampler
    row_items: torch.Tensor  # task.row_items of the training rows
    collate: Any
    val_loader: Any
    checkpointer: ckpt_lib.Checkpointer
    state: ckpt_lib.TrainState
    total_steps: int
    warmup: int
    accumulation: int
    no_decay: set
    n_params: int
    n_trainable: int
    held: list
    group_by_length: bool


def build(cfg: RunConfig, rt, task, pre: Preflight, run_dir: Path) -> Parts:
    """Data, model, optimizer, scheduler, sampler and checkpointer, then the resumed state
    loaded into them (a collective: every rank loads its part)."""
    t = cfg.train
    data = pre.data or _prepare_data(task, pre.cache, _tokenizer_dir(run_dir, pre.start),
                                     *task.sources(*_synthetic_files(task, rt, run_dir)))
    tokenizer, train_ds, val_ds = data
    if task.random_init():
        rt.on_main(_keep_tokenizer, tokenizer, run_dir / "tokenizer")
    rt.write_rank_file(run_dir, collective_timeout_s=t.collective_timeout_s,
                       tokenized_here={"train": not train_ds.from_cache, "validation": not val_ds.from_cache},
                       model_fetched_here=pre.fetched_here)
    from accelerate.utils import set_seed

    set_seed(t.seed)  # identical initial weights on every rank and in every rerun
    with rt.model_init(random_weights=task.random_init()):
        model = task.build_model(tokenizer, rt.weight_dtype)
    if pre.start.checkpoint is not None:  # its weights load below: the run does not say the new ones again
        task.fresh_note = ""
    models.check_positions(model, cfg.data.max_length, cfg.model.name)
    task.prepare(train_ds, rt.device)
    row_items = task.row_items(train_ds)
    group = cfg.data.group_by_length if cfg.data.group_by_length is not None else task.name == "classification"
    steps_per_epoch = batching.steps_per_epoch(len(train_ds), t.global_batch_size)
    if steps_per_epoch == 0:
        raise DataError(_too_few_rows(cfg, train_ds))
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    if warmup > total_steps:  # (a short smoke test of a long recipe): said, not refused
        rt.print(f"note: train.warmup_steps {warmup} is more than the run's {total_steps} steps: the learning rate "
                 f"peaks at {(total_steps - 1) / warmup:.0%} of train.lr")  # (step k of the warmup runs at k/warmup)
    no_decay = no_decay_names(model)
    model, optimizer = rt.prepare(model, _optimizer(model, t, rt.device, no_decay))
    if (line := task.check_loss(rt, model, val_ds)) is not None:
        rt.print(line)
    val_loader = task.eval_loader(rt, val_ds, cfg.eval.micro_batch_size or t.micro_batch_size, tokenizer)
    # Stepped by hand once per optimizer step: a prepared scheduler steps once per
    # process, which would make the LR schedule depend on the world size.
    scheduler = schedules.lr_scheduler(t.scheduler, optimizer, warmup, total_steps)
    rt.accelerator.register_for_checkpointing(scheduler)
    n_params, n_trainable, held = rt.parameter_counts(model)
    checkpointer = _checkpointer(cfg, rt, task, model, tokenizer, run_dir, n_params, n_trainable)
    start = pre.start
    state = (checkpointer.resume_from(start.checkpoint) if start.checkpoint is not None
             else ckpt_lib.TrainState(tracker_ids=start.tracker_ids, longest_batch_first=True))
    if start.forked_from is not None:
        state = state.for_new_run(start.tracker_ids)
    state.train_rows, state.validation_rows = task.train_examples(train_ds), len(val_ds)
    # A checkpoint written before epochs began with their longest batch goes on in its own order.
    sampler = batching.StepSampler(len(train_ds), t.global_batch_size, t.micro_batch_size, rt.rank, rt.world_size, t.seed,
                                   lengths=train_ds.lengths, group_by_length=group, longest_first=state.longest_batch_first)
    _follow_schedule(rt, pre, state, scheduler, optimizer, t, total_steps, sampler)
    accumulation = t.global_batch_size // (t.micro_batch_size * rt.world_size)
    # accelerate restores its micro-batch counter as the writer counted it; on another number
    # of ranks (another accumulation) that would move the accumulation boundaries: step 1 of
    # 2 ranks x 1 resumed as 1 process x 2 stepped the optimizer after each half-batch.
    rt.accelerator.step = state.step * accumulation
    return Parts(rt, task, run_dir, tokenizer, train_ds, val_ds, model, optimizer, scheduler, sampler, row_items,
                 task.collator(tokenizer),
                 val_loader, checkpointer, state, total_steps, warmup, accumulation, no_decay, n_params, n_trainable, held, group)


def _follow_schedule(rt, pre, state, scheduler, optimizer, t, total_steps: int, sampler) -> None:
    """After a resume, the next step's lr is the new config's schedule's
    (config_changes.follow_schedule); when that moves it (an extension, or more rows, re-spreads
    the schedule), the run says so. So it does where the data goes on under another global
    batch (allowed, or another run's checkpoint: StepSampler.moved_from)."""
    if pre.start.checkpoint is None:
        return
    if state.step > total_steps:  # (the start line says the new schedule's count: it trained none of them)
        key = "train.max_steps" if t.max_steps else "train.epochs"
        rt.print(f"note: the checkpoint is at step {state.step}, past the {total_steps} step(s) {key} now gives: "
                 f"nothing more trains; the run ends at step {state.step}")
    if "train.global_batch_size" in pre.changed and (moved := sampler.moved_from(pre.changed["train.global_batch_size"][0],
                                                                                 state.step)):
        rt.print(f"  {moved}")
    old_lr = optimizer.param_groups[0]["lr"]  # the next step's, as the checkpoint's schedule had it
    config_changes.follow_schedule(scheduler, optimizer, pre.changed, t.lr, t.weight_decay,
                                   always=pre.start.forked_from is not None)
    new_lr = optimizer.param_groups[0]["lr"]
    if not math.isclose(new_lr, old_lr, rel_tol=1e-6, abs_tol=1e-12) and state.step < total_steps:
        rt.print(f"learning rate: step {state.step + 1} runs at {new_lr:.3g} on the new {total_steps}-step {t.scheduler} "
                 f"schedule (the checkpoint's schedule had {old_lr:.3g})")


def _export_dtype(cfg: RunConfig, task) -> str:
    """checkpoint.export_dtype resolved: auto is the dtype the base model declares."""

    auto = cfg.checkpoint.export_dtype == "auto" and not task.random_init()
    return models.export_dtype(cfg.checkpoint.export_dtype, models.declared_dtype(cfg.model) if auto else None)


def run_record(task, export_dtype: str, precision: str) -> dict:
    """launcher.json's core, one definition for checkpoints and evaluated snapshots: the task's
    own record (labels, threshold, pooling...), the dtype the export is written in, and the
    precision that trained and evaluated it (`launcher eval` notes when its own differs)."""

    return task.metadata() | {"export_dtype": export_dtype, "precision": precision}


def _checkpointer(cfg: RunConfig, rt, task, model, tokenizer, run_dir: Path, n_params: int, n_trainable: int):
    """The checkpointer, with room for one more checkpoint checked on every rank's view of the
    run directory before any step runs: a full disk found at the first save would cost the
    steps before it. LoRA on a pretrained base: checkpoints hold what trains (adapters,
    modules_to_save) and the optimizer; the frozen base is read again from model.name on resume
    and by `launcher export`. A random tiny base exists nowhere else, so it is saved whole."""
    unwrapped = rt.unwrap(model)
    trainable_only = cfg.model.lora.enabled and not task.random_init()
    export_dtype = _export_dtype(cfg, task)
    in_checkpoint = {"launcher.json": json.dumps(run_record(task, export_dtype, cfg.train.precision) | (
        {"checkpoint_weights": "trainable", "base_model": cfg.model.name,
         "base_revision": hub.resolved_revision(cfg.model.name, cfg.model.revision),
         "base_weights": models.local_weights(cfg.model.name)}
        | ({"base_dtype": rt.weight_dtype} if cfg.model.quantization != "none" else {})
        if trainable_only else {"checkpoint_weights": "all"}))}
    skeleton = functools.partial(ckpt_lib.write_skeleton, model_config=unwrapped.config, tokenizer=task.tokenizer_to_save(tokenizer),
                                 extra_files=in_checkpoint, peft_config=getattr(unwrapped, "peft_config", {}).get("default"))
    checkpointer = ckpt_lib.Checkpointer(cfg.checkpoint, run_dir, rt, cfg.eval_metric not in LOWER_IS_BETTER, skeleton,
                                         trainable_only, export_dtype,
                                         rt.engine.export_reads_masters(cfg.train.precision, export_dtype, cfg.model.lora.enabled),
                                         run_config=dump_yaml(cfg))
    width = next(model.parameters()).element_size()
    saved = n_trainable if trainable_only else n_params
    checkpointer.need = ckpt_lib.check_space(rt, run_dir, sizing.checkpoint_bytes(saved, n_trainable, width))
    return checkpointer


def start_tracker(cfg: RunConfig, p: Parts, pre: Preflight, warm) -> tracking.Tracker:
    """The tracker run (a resumed run's own), its params and inputs, and the run described in a
    few lines. metrics.jsonl keeps records up to the resumed step; a restart in place keeps none."""
    rt, state, start = p.rt, p.state, pre.start
    kept_step = state.step if start.checkpoint else (-1 if start.restart_of_job or start.interrupted else None)
    if start.checkpoint is not None and start.forked_from is None and rt.is_main \
            and owner.newer_than(p.run_dir, start.checkpoint):
        # job.json is newer than the checkpoint when an attempt started a tracker run after it
        # (below) and was killed before its next checkpoint: that run goes on.
        state.tracker_ids = {**state.tracker_ids, **(owner.read_owner(p.run_dir).get("tracker_ids") or {})}
    before = dict(state.tracker_ids)
    tracker = tracking.start_tracking(tracking.Setup.of(cfg), rt.is_main, rt.facts(), p.run_dir, state.tracker_ids, kept_step, warm)
    # Merged: a tracker turned off for one attempt keeps its run id for the next (replaced, a
    # W&B run turned back on later started a second run).
    state.tracker_ids = {**state.tracker_ids, **tracker.ids()}
    if start.checkpoint is None or start.forked_from is not None:
        rt.on_main(owner.record_owner, p.run_dir, rt.job_id, state.tracker_ids)
    elif rt.is_main and state.tracker_ids != before:  # a new tracker run (one replaced, one turned on)
        owner.record_owner(p.run_dir, rt.job_id, state.tracker_ids)
    notes, derived = p.task.describe(p.train_ds, p.val_ds)
    padded, padded_random = p.sampler.padded_fraction(), p.sampler.padded_fraction(grouped=False)
    notes.append(f"padding: {padded:.1%} of the tokens in {'length-grouped' if p.group_by_length else 'random'} micro-batches"
                 + (f" (random batches: {padded_random:.1%})" if p.group_by_length else ""))
    tracker.log_params(
        flatten(to_dict(cfg))
        | {
            "derived.world_size": rt.world_size,
            "derived.gradient_accumulation_steps": p.accumulation,
            "derived.steps_per_epoch": p.sampler.steps_per_epoch,
            "derived.total_steps": p.total_steps,
            "derived.warmup_steps": p.warmup,
            "derived.n_train": len(p.train_ds),
            "derived.n_validation": len(p.val_ds),
            "derived.n_parameters": p.n_params,
            "derived.n_trainable_parameters": p.n_trainable,
            "derived.padded_token_fraction": round(padded, 4),
            "derived.padded_token_fraction_random": round(padded_random, 4),
        }
        | derived
        | config_changes.params(state.step, pre.changed, p.run_dir)  # (a restart in place's at step 0)
        | ({"started_from": str(start.forked_from.resolve())} if start.forked_from is not None else {})
        | ({f"resumed_at_{state.step}.world_size": f"{pre.resumed.world_size} -> {rt.world_size}"}
           if pre.moved and pre.resumed else {}),  # a resume on another number of ranks
        resumed_at=state.step if start.checkpoint is not None or start.interrupted or start.restart_of_job else None,
    )
    if cfg.tracking.log_datasets:
        tracker.log_inputs(tracking.data_inputs(p.train_ds, p.val_ds))
    t = cfg.train
    packed = getattr(cfg.data, "packing", False)  # a packed run's unit is a block of several examples
    rt.print(f"{len(p.train_ds)} train {'blocks' if packed else 'rows'} / {len(p.val_ds)} validation rows, "
             f"{p.n_params:,} parameters; {p.total_steps} step{'' if p.total_steps == 1 else 's'} of {t.global_batch_size} {'blocks' if packed else 'examples'} "
             f"({t.micro_batch_size} x {p.accumulation} accumulation x {rt.world_size} ranks)")
    if p.n_trainable != p.n_params:
        rt.print(f"LoRA: {p.n_trainable:,} of {p.n_params:,} parameters trainable ({p.n_trainable / p.n_params:.2%})")
    for line in notes:
        rt.print(line)
    if rt.engine.shards_parameters:
        rt.print(f"{rt.engine.label}: parameters held per rank: {' / '.join(f'{n:,}' for n in p.held)} of {p.n_params:,}")
    return tracker


# ---- the steps


@dataclass
class Schedule:
    """What is due after optimizer step `step` (counted from 1): functions of the step and the
    config alone, so every rank decides alike without talking."""

    total: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    flush_every: int
    halt_at: int | None

    def last(self, step: int) -> bool:
        return step == self.total

    def log(self, step: int) -> bool:
        return step % self.log_every == 0 or self.last(step)

    def eval(self, step: int) -> bool:
        return bool(self.eval_every and step % self.eval_every == 0) or self.last(step)

    def halt(self, step: int) -> bool:
        return step == self.halt_at and not self.last(step)

    def checkpoint(self, step: int) -> bool:
        """checkpoint.every_steps, and the last step (what the export is made from). A stop (a
        halt, a signal, an early stop) and a new best kept in a checkpoint also save one:
        those are decided by the step's outcome, in Trainer.after_step."""
        return bool(self.checkpoint_every and step % self.checkpoint_every == 0) or self.last(step)

    def flush(self, step: int) -> bool:
        """tracking.flush_every_steps, and every evaluation: its metrics and samples go out when
        made, not up to flush_every steps later (a checkpoint flushes and waits: after_step)."""
        return step % self.flush_every == 0 or self.eval(step)


@dataclass
class StepStats:
    """One optimizer step: this rank's loss sum (on the device: no host sync), the global item
    count it is divided by, this rank's real tokens, the lr it ran at, the clipped grad norm."""

    loss_sum: torch.Tensor
    items: float
    tokens: int
    lr: float
    grad_norm: Any


class Window:
    """The logging window (tracking.log_every_steps): the steps' losses stay on the device until
    the window is logged, then one reduce carries them all. train/loss is the window's mean of
    the steps' global mean losses."""

    def __init__(self):
        self.t0, self.steps = time.perf_counter(), []

    def add(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def values(self, rt, global_batch: int, epoch: float) -> dict:
        """A collective (sum over ranks). Starts the next window."""
        n, last = len(self.steps), self.steps[-1]
        tokens = torch.tensor(float(sum(s.tokens for s in self.steps)), device=rt.device)
        stats = rt.accelerator.reduce(torch.stack([s.loss_sum for s in self.steps] + [tokens]).to(rt.device), reduction="sum")
        dt = time.perf_counter() - self.t0
        values = {
            "train/loss": sum(float(stats[i]) / max(s.items, 1.0) for i, s in enumerate(self.steps)) / n,
            "train/lr": last.lr,
            "train/samples_per_s": n * global_batch / dt,
            "train/tokens_per_s": float(stats[-1]) / dt,
            "train/step_time_s": dt / n,
            "train/epoch": epoch,
        }
        if last.grad_norm is not None:
            values["train/grad_norm"] = float(last.grad_norm)
        self.t0, self.steps = time.perf_counter(), []
        return values


class Trainer:
    """The steps of a built run and its end. Every method runs on every rank, in step."""

    def __init__(self, cfg: RunConfig, parts: Parts, tracker):
        self.cfg, self.p, self.tracker = cfg, parts, tracker
        self.rt, self.state, self.model = parts.rt, parts.state, parts.model
        c = cfg.tracking
        self.schedule = Schedule(parts.total_steps, c.log_every_steps, cfg.eval.every_steps, cfg.checkpoint.every_steps,
                                 c.flush_every_steps, cfg.train.halt_at_step)
        self.dog = watchdog.Watchdog(parts.run_dir / "ranks", self.rt.rank, self.rt.world_size, cfg.train.hang_timeout_s,
                                     self.rt.print)
        self.speed = _speedometer(cfg, self.rt, self.rt.unwrap(parts.model), parts.n_params, parts.n_trainable,
                                  parts.train_ds)
        self.last_eval: dict = {}
        self.last_eval_step = 0
        self.stop_signal: str | None = None
        # DeepSpeed's fp32 masters feed an export in another dtype than the 16-bit weights: they
        # live in full checkpoints only, so then the best evaluation's weights are one as well.
        self.reads_masters = parts.checkpointer.reads_masters

    def run(self) -> str | None:
        """From the resumed step to the end of the schedule: None, or why it stopped earlier
        ("early_stop", "halt", "signal")."""
        p, state, cfg = self.p, self.state, self.cfg
        if state.step == 0 and (signalled := self.rt.stop_requested()):  # a collective, as after every step
            # Asked during start-up: nothing is trained, so nothing is saved. The step-0
            # evaluation and a first step (a preemption's grace need not fit them) would be lost.
            self.stop_signal = signalled
            return "signal"
        at_start = state.step == 0 and cfg.eval.at_start
        self.dog.beat(state.step, "eval" if at_start else "train")
        if at_start:
            state.first_eval = self.evaluate(0)
        self.last_eval, self.last_eval_step = state.first_eval, 0
        self._snapshot_resumed_best()
        self.model.train()
        window, first_step = Window(), state.step
        batches = batching.train_batches(p.train_ds, p.sampler, state.step, p.total_steps, p.collate, cfg.data.num_workers,
                                         pin_memory=self.rt.device.type == "cuda")
        # closing: an early stop or an error in the step stops the loader's workers now.
        with contextlib.closing(batches), \
                self.rt.progress(p.total_steps, initial=state.step, every_s=cfg.tracking.print_every_s) as bar:
            for step, micro_batches in batches:
                if step == first_step:  # the first window's clock: not the loader's workers starting
                    window.t0 = time.perf_counter()
                window.add(self.train_step(step, micro_batches))
                state.step, state.epoch, state.metric_at_step = step + 1, p.sampler.epochs_done(step + 1), None
                faults.point("step", state.step)
                self.dog.beat(state.step)
                bar.update(1)
                if step == first_step:
                    self.rt.print(f"first optimizer step done {time.time() - launcher.STARTED:.1f} s after start")
                    aside = time.perf_counter()
                    self.rt.write_model_facts(p.run_dir, self.model, p.optimizer, p.no_decay)
                    window.t0 += time.perf_counter() - aside  # (nor this record)
                stop = self.after_step(window, bar)
                if stop:
                    return stop
        return None

    def train_step(self, step: int, micro_batches: list) -> StepStats:
        """One optimizer step (`step` counts from 0). It minimises the mean over the global batch's
        items (response tokens, or examples / class weights): each micro-batch contributes its
        SUM of item losses over the global item count, whatever its own size. The engines
        average gradients over micro-batches and ranks, hence world x accumulation. The item count
        is summed from the step's rows, which every rank knows: no collective counts it."""
        p, rt, model = self.p, self.rt, self.model
        acc = rt.accelerator
        items = float(p.row_items[p.sampler.step_indices(step)].sum())  # no collective: see row_items
        if CHECK_ITEMS:
            _check_items(rt, p.run_dir, step, items, [p.task.loss_items(b) for b, _ in micro_batches])
        scale = rt.world_size * p.accumulation / max(items, 1.0)
        loss_sum, tokens, grad_norm = torch.zeros((), device=rt.device), 0, None
        lr = p.optimizer.param_groups[0]["lr"]
        for k, (batch, n_tokens) in enumerate(micro_batches):
            # Dropout masks depend on (seed, step, micro-batch within the global batch) only:
            # a resumed run, and a run on any number of ranks, draw the same masks.
            torch.manual_seed(_dropout_seed(self.cfg.train.seed, step, p.sampler.microbatch_index(k)))
            tokens += n_tokens  # real tokens, not padding
            # Under the run's autocast, as a prepared model's own forward runs: the self-check and
            # any loss a task computes beside the forward get the same dtypes.
            with acc.accumulate(model):
                with acc.autocast():
                    loss = p.task.loss_sum(model, _to(batch, rt.device))
                acc.backward(loss * scale)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), self.cfg.train.max_grad_norm or float("inf"))
                p.optimizer.step()
                p.optimizer.zero_grad()
            loss_sum += loss.detach().float()
        faults.stall(step + 1)
        if not getattr(p.optimizer, "step_was_skipped", False):  # fp16: a step skipped on overflow keeps its lr
            p.scheduler.step()
        return StepStats(loss_sum, items, tokens, lr, grad_norm)

    def after_step(self, window: Window, bar) -> str | None:
        """What the Schedule says is due after the step: log, evaluate (collectives), halt, stop
        on a signal (a collective: every rank stops at the same step), checkpoint. Returns why
        the run stops here, or None."""
        state, s, cfg = self.state, self.schedule, self.cfg
        step, stop = state.step, None
        if s.log(step):
            self.log(window.values(self.rt, cfg.train.global_batch_size, state.epoch), bar)
        aside = time.perf_counter()  # evaluation, snapshot, checkpoint: not in the next logged step's time
        if s.eval(step):
            metrics = self.last_eval = self.evaluate(step)
            self.last_eval_step = step
            stop = _track_best(state, metrics, cfg.eval_metric, cfg.eval_metric not in LOWER_IS_BETTER,
                               cfg.eval.early_stopping_patience)
        if s.halt(step):
            stop = stop or "halt"
        signalled = self.rt.stop_requested()
        if signalled and not s.last(step):
            stop, self.stop_signal = stop or "signal", signalled
        if stop and window.steps:  # a stop off the logging cadence: its window's losses are logged, not lost
            window.t0 += time.perf_counter() - aside
            self.log(window.values(self.rt, cfg.train.global_batch_size, state.epoch), bar)
            aside = time.perf_counter()
        improved = state.best_step == step and cfg.checkpoint.export == "best" and not s.last(step)  # model/ may come from here
        in_checkpoint = self.p.checkpointer.best_in_checkpoint
        if improved and not in_checkpoint:  # before the checkpoint that records it as the best
            self.snapshot_best(step)
        if s.checkpoint(step) or stop or (improved and in_checkpoint):
            self.tracker.flush(wait=True)
            self.dog.beat(step, "checkpoint")
            self.p.checkpointer.save(state)
        elif s.flush(step):
            self.tracker.flush()
        self.dog.beat(step)
        window.t0 += time.perf_counter() - aside
        return stop

    def snapshot_best(self, step: int) -> None:
        """checkpoint.export: best: the improving evaluation's weights only, as an export in the
        export dtype (RUN/best, replaced when beaten), with the evaluation outputs a decision
        rule is tuned on: the weights alone, without the fp32 masters and Adam's moments of a
        checkpoint (a third of a full MiniLM checkpoint in float32)."""
        p = self.p
        self.dog.beat(step, "export")
        outputs = p.task.eval_outputs()
        ckpt_lib.export_model(self.rt, self.model, p.task.tokenizer_to_save(p.tokenizer), p.run_dir / ckpt_lib.BEST,
                              {"launcher.json": self._launcher_json(),
                               ckpt_lib.BEST_FILE: json.dumps({"step": step, "export_dtype": p.checkpointer.export_dtype})},
                              random_base=p.task.random_init(), dtype=p.checkpointer.export_dtype, base_name=self.cfg.model.name,
                              snapshot={ckpt_lib.EVAL_OUTPUTS: outputs} if outputs else {})
        self.dog.beat(step)

    def _snapshot_resumed_best(self) -> None:
        """A run resumed (say, extended) from the checkpoint of its best evaluation, which was its
        last step then and so never snapshotted: the snapshot is taken now, from those weights,
        before a later checkpoint makes that one rotate away."""
        p, state, cfg = self.p, self.state, self.cfg
        if (cfg.checkpoint.export != "best" or p.checkpointer.best_in_checkpoint or state.step == 0
                or state.best_step != state.step or self.schedule.last(state.step)):
            return
        needed = p.task.eval_outputs_needed()
        held = ckpt_lib.best_snapshot(p.run_dir, state.step, p.checkpointer.export_dtype, needed) if self.rt.is_main else None
        if self.rt.gather_objects(held is not None)[0]:
            return
        if needed:  # the outputs a threshold is tuned on, from these weights
            self.metrics(state.step)
        self.snapshot_best(state.step)

    def _launcher_json(self) -> str:
        return json.dumps(run_record(self.p.task, self.p.checkpointer.export_dtype, self.cfg.train.precision))

    def log(self, values: dict, bar) -> None:
        values |= self.speed(values["train/tokens_per_s"])
        self.tracker.log_metrics(values, step=self.state.step)
        self.rt.preemption.stepped(values["train/step_time_s"])
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.1e}",
                        tok_s=f"{values['train/tokens_per_s']:,.0f}",
                        **({"mfu": f"{values['train/mfu']:.1%}"} if "train/mfu" in values else {}))

    def metrics(self, step: int) -> dict:
        """The validation metrics (a collective; every batch is progress for the watchdog)."""
        self.dog.beat(step, "eval")
        return self.p.task.evaluate(self.rt, self.model, self.dog.beating(self.p.val_loader, step, "eval"))

    def evaluate(self, step: int) -> dict:
        """The validation metrics logged and printed, and the sample generations."""
        faults.stall("eval")
        metrics = self.metrics(step)
        self.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        self.rt.print(f"step {step} eval: " + report.one_line(metrics))
        _log_samples(self.rt, self.p.task, self.model, self.p.tokenizer, self.tracker, self.p.run_dir, step)
        return metrics

    # ---- the end

    def stopped(self, stop: str) -> dict:
        """A halt or a signal: the checkpoint is saved (none before the first step: the run
        directory is marked to start again in place); the tracker run ends KILLED, to go on."""
        why = "train.halt_at_step" if stop == "halt" else self.stop_signal
        if self.state.step == 0:  # asked before the first step (run): no checkpoint, a mark to start again in place
            if self.rt.is_main:
                preemption.mark_interrupted(self.p.run_dir, f"stopped before its first step ({why})")
            self.rt.print(f"stopped before the first step ({why}); nothing is trained yet, so there is no checkpoint; "
                          "the same command starts the run again from step 0 in place")
        else:
            self.rt.print(f"stopped at step {self.state.step} ({why}); checkpoint saved; run the same command again to resume")
        if self.stop_signal and self.rt.is_main:  # (also with a halt at the same step)
            # slurm/train.sh requeues only a run that stopped early; not one its own timer
            # stopped before the first step (the next attempt's start-up would take as long)
            preemption.acknowledge(self.stop_signal + (f" {preemption.BEFORE_FIRST_STEP}" if self.state.step == 0 else ""))
        self.tracker.finish(status="KILLED")
        return {"status": "halted" if stop == "halt" else "stopped", "step": self.state.step, "run_dir": str(self.p.run_dir)}

    def finish(self, stop: str | None) -> dict:
        """The end of the schedule or an early stop: the weights to export (the last, or the best
        evaluation's: a collective load), the decision threshold tuned, the export gathered and
        written, the summary logged."""
        p, rt, state, cfg = self.p, self.rt, self.state, self.cfg
        metric = cfg.eval_metric
        if stop == "early_stop":
            rt.print(f"early stop at step {state.step}: no {metric} improvement in {cfg.eval.early_stopping_patience} evals")
        last_eval = self.last_eval if self.last_eval_step == state.step else self.metrics(state.step)  # resumed
        exported_step, exported_eval = state.step, last_eval  # after the last step but before the export
        snapshot, outputs = None, None
        if cfg.checkpoint.export == "best" and state.best_step is not None and state.best_step != state.step:
            # Rank 0 looks and every rank follows: what comes next is a collective.
            found = ckpt_lib.best_snapshot(p.run_dir, state.best_step, p.checkpointer.export_dtype,
                                           p.task.eval_outputs_needed()) if rt.is_main else None
            full = p.checkpointer.best(state) if rt.is_main and found is None else None
            found, full = rt.gather_objects((found, full))[0]
            if found is not None or full is not None:
                if full is not None:
                    self.dog.beat(state.step, "checkpoint")
                    p.checkpointer.load(full)
                snapshot = found
                outputs = ckpt_lib.snapshot_outputs(snapshot) if snapshot is not None else None
                exported_step, exported_eval = state.best_step, state.best_eval
                rt.print(f"exporting the best evaluation's weights: step {exported_step} "
                         f"({metric} {state.best_metric:.4f}; the last step, {state.step}, had {last_eval[metric]:.4f})")
            else:  # e.g. a resume that changed the export dtype, or did not evaluate that step again
                rt.print(f"the best evaluation's weights (step {state.best_step}) were not kept as this run needs them; "
                         "exporting the last step's")
        tuned = p.task.tune(rt, self.model, self.dog.beating(p.val_loader, state.step, "eval"), outputs)  # eval.tune_threshold
        if tuned is not None:
            exported_eval = tuned
            # (for macro-F1, whatever eval.metric is: a loss has no value per cut)
            rt.print(f"decision threshold tuned on validation for macro-F1: {getattr(p.task, 'threshold', None)} "
                     f"(macro_f1 {tuned['macro_f1']:.4f}; at 0.5: {tuned['macro_f1@0.5']:.4f})")
        model_dir, dtype = p.run_dir / "model", p.checkpointer.export_dtype
        self.dog.beat(state.step, "export")
        if snapshot is not None:
            ckpt_lib.main_writes_others_wait(rt, lambda: ckpt_lib.adopt_snapshot(snapshot, model_dir, self._launcher_json()),
                                             p.run_dir, "the export")
        else:  # the live weights; DeepSpeed's other-dtype export from the masters of the checkpoint last
            # sealed or loaded, which holds the exported step (the last step is always saved, a resume
            # at the end loads it, and export: best loaded the best one above)
            ckpt_lib.export_model(rt, self.model, p.task.tokenizer_to_save(p.tokenizer), model_dir,
                                  {"launcher.json": self._launcher_json()},
                                  random_base=p.task.random_init(), dtype=dtype, base_name=self.cfg.model.name,
                                  masters=p.checkpointer.last if self.reads_masters else None)
        summary = {"step": state.step, "before": state.first_eval, "after": exported_eval, "last": last_eval,
                   "exported_step": exported_step, "best_step": state.best_step, "best": state.best_metric}
        self.tracker.log_outcome({"exported.step": exported_step, f"exported.{metric}": exported_eval.get(metric)})
        rt.on_main(_write_outputs, p.run_dir, summary, self.tracker)
        if snapshot is None:
            rt.on_main(ckpt_lib.remove_best, p.run_dir)  # a snapshot of no use any more
        if cfg.tracking.log_model:
            self.tracker.log_model(model_dir, exported_step, cfg.tracking.register_model)
        rt.print(report.final_table(state.first_eval, exported_eval, exported_step))
        for line in _where_things_are(cfg, state, exported_step, p.run_dir):
            rt.print(line)
        self.tracker.finish()
        return {"status": "finished", "run_dir": str(p.run_dir), **summary}


def _where_things_are(cfg: RunConfig, state, exported_step: int, run_dir: Path) -> list[str]:
    lines = [f"exported:    step {exported_step} of {state.step} (checkpoint.export: {cfg.checkpoint.export})"]
    if cfg.tracking.mlflow:
        lines.append(f"MLflow run:  {state.tracker_ids.get('mlflow', '-')} at {redact_uri(cfg.tracking_uri)}")
        if not cfg.tracking.uri:
            lines.append(f"  browse:    mlflow ui --backend-store-uri {cfg.tracking_uri}")
    return lines + [f"checkpoints: {run_dir / 'checkpoints'}", f"model:       {run_dir / 'model'}"]


# ---- helpers


def _prepare_run_dir(cfg: RunConfig, rt, start: ckpt_lib.Start) -> Path:
    run_dir = cfg.run_dir

    def create() -> str | None:
        run_dir.mkdir(parents=True, exist_ok=True)
        refused = owner.take_lease(run_dir, rt.job_id)  # first: another launch training here is left alone
        if refused is not None:
            return refused
        if start.checkpoint is None or start.forked_from is not None:
            write_atomically(run_dir / "config.yaml", dump_yaml(cfg))
            owner.record_owner(run_dir, rt.job_id, start.tracker_ids, start.forked_from)
            (run_dir / INTERRUPTED).unlink(missing_ok=True)  # this attempt restarts in place
        elif start.went_back:
            prior = owner.read_owner(run_dir)
            owner.record_owner(run_dir, rt.job_id, prior.get("tracker_ids"), went_back_to=start.checkpoint)
        return None

    refused = rt.gather_objects(rt.on_main(create))[0]  # every rank stops alike
    if refused is not None:
        raise ConfigError(refused)
    return run_dir


def _synthetic_files(task, rt, run_dir: Path) -> tuple[str, str]:
    out = run_dir / "data"

    def write():
        # Rank 0 alone decides: had each rank looked for the file itself, a rank that looked
        # after rank 0 had written it would skip the barrier the others wait in (seen: a hang).
        if not (out / "validation.jsonl").is_file():  # a resumed run keeps its data
            task.write_synthetic(out)

    rt.on_main(write)
    return str(out / "train.jsonl"), str(out / "validation.jsonl")


def _check_base(cfg, checkpoint: Path, rt) -> None:
    """A LoRA checkpoint's frozen base, read again from model.name, must be the one it trained
    on; under checkpoint.resume_changed=allow another one is taken, and said (it was taken
    without a word, and recorded nowhere but in the next checkpoint's fingerprint)."""
    allow = cfg.checkpoint.resume_changed == "allow"
    try:
        models.same_base(cfg.model.name, ckpt_lib.base_weights(checkpoint), "model.name",
                         "checkpoint.resume_changed=allow: the adapters go on training on this base" if allow else
                         "put the run's base back there (a relative name is read from the directory you start in), or "
                         "set checkpoint.resume_changed=allow to train these adapters on it")
    except ConfigError as e:
        if not allow:
            raise
        rt.print(f"note: {e.problems[0]}")


def _prepare_data(task, cache, tokenizer_dir: Path, train_source, val_source):
    """(tokenizer, train rows, validation rows): checked and tokenized once per data cache,
    memory-mapped by every rank. A resumed tiny-model run reuses the tokenizer it saved."""
    tokenizer = task.tokenizer(tokenizer_dir, train_source, cache)
    train_ds, val_ds = task.datasets(train_source, val_source, tokenizer, cache)
    return tokenizer, train_ds, val_ds


def _tokenizer_dir(run_dir: Path, start: ckpt_lib.Start) -> Path:
    """Where a tiny model's tokenizer is kept: the run directory, or for a run started from
    another run's checkpoint, that checkpoint's (trained on that run's data)."""
    if start.forked_from is not None and not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        return start.forked_from / ckpt_lib.SKELETON
    return run_dir / "tokenizer"


def _keep_tokenizer(tokenizer, out: Path) -> None:
    """A tiny model's tokenizer goes into the run directory once: a resumed run reads it back.
    Rank 0 alone looks for it (inside on_main), so every rank reaches the same barrier. Written
    beside it and renamed into place: a rank that finds tokenizer.json (a slower rank's data
    preparation, a resume after a kill) finds it whole."""
    import shutil

    if (out / "tokenizer.json").is_file():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    ckpt_lib.replace_dir(tmp, out)  # (replacing what a kill left of an older, non-atomic write)


def no_decay_names(model) -> set[str]:
    """Parameters that take no weight decay: biases and every parameter of a normalisation
    layer, by name and module type. Not by shape: under ZeRO-3 a pretrained model's
    parameters are already partitioned when the optimizer is built, and every one of
    them looks 0-dimensional (shared/NOTES.md)."""
    out = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        for name, _ in module.named_parameters(prefix=module_name, recurse=False):
            if is_norm or name.endswith("bias"):
                out.add(name)
    return out


def _optimizer(model, t, device, skip: set[str]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (train section `t`), without decay for `skip`."""
    decay: list = []
    no_decay: list = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused AdamW is what HF Trainer uses by default; it beats the per-tensor loop on CPU too (measured here).
    try:
        return torch.optim.AdamW(groups, lr=t.lr, fused=device.type in ("cpu", "cuda"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=t.lr, foreach=True)


def _to(batch: dict, device) -> dict:
    """The batch's tensors on the device (a flattened packed batch also holds ints)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _log_samples(rt, task, model, tokenizer, tracker, run_dir: Path, step: int) -> None:
    """Sample generations (every rank generates: a collective under ZeRO-3); rank 0 prints
    them and records them in RUN/generations.jsonl, the side-by-side table and MLflow."""
    rows = task.samples(rt, model, tokenizer)
    answered = [r for r in getattr(task, "last_rows", []) if "response" in r]
    if answered:  # every answer of the evaluation, for error analysis: RUN/predictions/step-N.jsonl
        rt.on_main(report.record_predictions, run_dir, step, answered, getattr(task, "answers", None))
    if rows:
        rt.on_main(report.record_generations, run_dir, step, rows, tracker)
        for r in rows:
            rt.print(f"  [{step}] {r['prompt']!r} -> {r['response']!r}")


def _too_few_rows(cfg: RunConfig, train_ds) -> str:
    """One global batch does not fit the training data: counted in rows, as the user wrote them."""
    d, t = cfg.data, cfg.train
    where = d.train_file or "training data"
    stats = train_ds.meta.get("stats") or {}
    if d.packing:
        rows = stats.get("rows", 0) - stats.get("dropped", 0)
        return (f"{where}: {rows} rows pack into {len(train_ds)} blocks of {d.max_length} tokens, and with data.packing "
                f"train.global_batch_size ({t.global_batch_size}) counts blocks: lower it to {len(train_ds)} or less "
                "(and train.micro_batch_size with it), or set data.packing=false")
    return f"{where}: {len(train_ds)} rows is fewer than train.global_batch_size ({t.global_batch_size})"


def _speedometer(cfg: RunConfig, rt, model, n_params: int, n_trainable: int, train_ds):
    """values(tokens per second, all ranks) -> MFU and peak GPU memory (CUDA only). The attention
    term's context is the training tokens' mean (TokenRows.attention_context), not max_length:
    short examples, or packed blocks of them, attend over far fewer tokens (SmolLM2-135M at
    max_length 2048: the attention term was a third of its count)."""
    from launcher import engines, throughput

    if rt.device.type != "cuda":
        return lambda tokens_per_s: {}
    layers, hidden = throughput.model_shape(model.config)
    per_token = throughput.flops_per_token(throughput.matmul_params(model, engines.full_numel), n_trainable,
                                           layers, hidden, train_ds.attention_context(), n_params)
    peak = throughput.peak_flops(torch.cuda.get_device_name(rt.device), cfg.train.precision, cfg.train.peak_tflops)

    def values(tokens_per_s: float) -> dict:
        out = {"train/gpu_mem_peak_gb": torch.cuda.max_memory_allocated(rt.device) / 2**30}
        if peak:
            out["train/mfu"] = per_token * tokens_per_s / (peak * rt.world_size)
        return out

    return values


def _check_items(rt, run_dir: Path, step: int, items: float, per_micro: list[float]) -> None:
    """The test suite's cross-check (CHECK_ITEMS) of a step's item count, summed from the rows
    it holds (task.row_items), against what the collated micro-batches of every rank hold
    (task.loss_items, all-reduced: the collective the row sums replace). Each rank also
    records the three numbers (RUN/ranks/items-rank-N.jsonl) for the tests to read."""
    local = torch.tensor([float(sum(per_micro))], dtype=torch.float64, device=rt.device)
    counted = float(rt.accelerator.reduce(local, reduction="sum")) if rt.world_size > 1 else float(local)
    with open(run_dir / "ranks" / f"items-rank-{rt.rank:05d}.jsonl", "a") as f:
        f.write(json.dumps({"step": step + 1, "from_rows": items, "here": float(local), "all_reduced": counted}) + "\n")
    if abs(counted - items) > 1e-9 * max(abs(counted), 1.0):
        raise AssertionError(f"step {step + 1}: {items} items from the rows' counts, {counted} in the batches")


def _dropout_seed(seed: int, step: int, microbatch: int) -> int:
    return (seed * 1_000_003 + step) * 100_003 + microbatch


def _track_best(state, metrics: dict, metric: str, higher_is_better: bool, patience: int) -> str | None:
    value = metrics[metric]
    state.metric_at_step = value
    # A NaN (a diverged evaluation's loss) is never the best: as the first evaluation it would
    # stand unbeaten (every comparison with it is False) until patience stopped the run.
    best = state.best_metric
    improved = math.isfinite(value) and (best is None or not math.isfinite(best)
                                         or (value > best if higher_is_better else value < best))
    if improved:
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        state.best_eval = dict(metrics)
        return None
    state.evals_without_improvement += 1
    return "early_stop" if patience and state.evals_without_improvement >= patience else None


def _write_outputs(run_dir: Path, summary: dict, tracker) -> None:
    write_atomically(run_dir / "final_metrics.json", json.dumps(summary, indent=1))
    tracker.flush()
    plot = report.plot_run(run_dir / "metrics.jsonl", summary["after"], run_dir / "training.png")
    for path in (run_dir / "config.yaml", run_dir / "final_metrics.json", plot):
        if path is not None and Path(path).is_file():
            tracker.log_artifact(path)
