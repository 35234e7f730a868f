"""The training loop, readable top to bottom.

It names no backend and holds no rank checks: the runtime decides who prints and
which ranks exist, the tracker decides who logs, the checkpointer decides when
to save. Every rank runs every line here, so every collective (save_state, the
export gather, metric reduction) is reached by all of them.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import torch

import launcher
from launcher import checkpoint as ckpt_lib
from launcher import report
from launcher import config_changes, faults, hub, sizing, tasks, tracking, watchdog
from launcher.config import LOWER_IS_BETTER, RunConfig, dump_yaml, flatten, redact_uri, to_dict
from launcher.data import batching
from launcher.errors import DataError, RunError, UserError
from launcher.runtime import build_runtime


def _prepare_run_dir(cfg: RunConfig, rt, start: ckpt_lib.Start) -> Path:
    run_dir = cfg.run_dir

    def create():
        run_dir.mkdir(parents=True, exist_ok=True)
        if start.checkpoint is None:
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
            ckpt_lib.record_owner(run_dir, rt.job_id, start.tracker_ids)

    rt.on_main(create)
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


def _prepare_data(task, cache, run_dir: Path, train_source, val_source):
    """(tokenizer, train rows, validation rows): checked and tokenized once per data cache,
    memory-mapped by every rank. A resumed tiny-model run reuses the tokenizer it saved."""
    tokenizer = task.tokenizer(run_dir / "tokenizer", train_source, cache)
    train_ds, val_ds = task.datasets(train_source, val_source, tokenizer, cache)
    return tokenizer, train_ds, val_ds


def _keep_tokenizer(tokenizer, out: Path) -> None:
    """A tiny model's tokenizer goes into the run directory once: a resumed run reads it back.
    Rank 0 alone looks for it (inside on_main), so every rank reaches the same barrier."""
    if not (out / "tokenizer.json").is_file():
        tokenizer.save_pretrained(out)


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


def _optimizer(model, cfg: RunConfig, device, skip: set[str]) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused AdamW is what HF Trainer uses by default; it beats the per-tensor loop on CPU too (NOTES.md).
    try:
        return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=device.type in ("cpu", "cuda"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.train.lr, foreach=True)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(cfg: RunConfig) -> dict:
    t = cfg.train
    task = tasks.for_config(cfg)
    rt = build_runtime(cfg)
    rt.watch_signals()  # from here a SIGTERM/SIGUSR1 means: checkpoint at the next step end, then exit
    accumulation = t.global_batch_size // (t.micro_batch_size * rt.world_size)
    start = ckpt_lib.resolve_resume(cfg.run_dir, cfg.checkpoint.resume, rt.job_id, cfg.checkpoint.trust)
    resume_from = start.checkpoint
    changed = config_changes.check_resume(cfg, resume_from)  # another run's config: one line, nothing built
    resumed = ckpt_lib.TrainState.read(resume_from) if resume_from is not None else None
    moved = ckpt_lib.check_layout(resume_from, resumed, rt) if resumed else None  # another engine: one line
    # A model or data row that cannot load fails before anything is written. Synthetic
    # data is generated into the run directory, so it is read once that exists.
    ckpt_lib.check_writable(Path(cfg.output_dir))  # every rank: each writes its part of a checkpoint
    cache = rt.data_cache(Path(cfg.data.cache_dir or Path(cfg.output_dir) / ".cache"), cfg.data.cache_shared)
    fetched_here = hub.resolve(cfg.model, rt, cache)  # a hub model or GGUF file: once per node, then offline
    task.check_model_source()
    tracking.check_reachable(cfg)  # every rank: they must agree to stop
    data = None
    if not cfg.data.synthetic.enabled:
        data = _prepare_data(task, cache, cfg.run_dir, *task.sources(cfg.data.train_file, cfg.data.validation_file))
    rt.barrier()  # every rank has decided before rank 0 creates anything
    run_dir = _prepare_run_dir(cfg, rt, start)
    warm_tracker = tracking.warm_up(cfg, rt.is_main)  # overlaps the model load
    rt.print(f"run directory: {run_dir}  ({rt.world_size} process(es) on {rt.num_nodes} node(s), {rt.distributed_type}, {rt.device})")
    for note in rt.notes or []:
        rt.print(note)
    if start.partial:
        rt.print(f"ignoring what a killed attempt left half-written: {', '.join(p.name for p in start.partial)} "
                 "(never loaded); removed")
        rt.on_main(ckpt_lib.remove_partial, start.partial)
    if resume_from is not None:
        rt.print(f"resuming from {resume_from}")
        if moved:
            rt.print(moved)
        for line in rt.on_main(config_changes.record, run_dir, resumed.step, changed, cfg) or []:
            rt.print(line)
    if start.restart_of_job:
        rt.print(f"restarting from step 0 in place: an earlier attempt of job {start.restart_of_job} "
                 "stopped before its first checkpoint")

    # ---- data, tokenizer, model
    if data is None:
        data = _prepare_data(task, cache, run_dir, *task.sources(*_synthetic_files(task, rt, run_dir)))
    tokenizer, train_ds, val_ds = data
    if task.random_init():
        rt.on_main(_keep_tokenizer, tokenizer, run_dir / "tokenizer")
    rt.write_rank_file(run_dir, collective_timeout_s=t.collective_timeout_s,
                       tokenized_here={"train": not train_ds.from_cache, "validation": not val_ds.from_cache},
                       model_fetched_here=fetched_here)
    from accelerate.utils import set_seed

    set_seed(t.seed)  # identical initial weights on every rank and in every rerun
    with rt.model_init(random_weights=task.random_init()):
        model = task.build_model(tokenizer, rt.weight_dtype)
    task.prepare(train_ds, rt.device)

    group = cfg.data.group_by_length if cfg.data.group_by_length is not None else task.name == "classification"
    sampler = batching.StepSampler(len(train_ds), t.global_batch_size, t.micro_batch_size, rt.rank, rt.world_size, t.seed,
                                   lengths=train_ds.lengths, group_by_length=group)
    if sampler.steps_per_epoch == 0:
        raise DataError(_too_few_rows(cfg, train_ds))
    total_steps = t.max_steps or t.epochs * sampler.steps_per_epoch
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)

    from transformers import get_scheduler

    collate = task.collator(tokenizer)
    no_decay = no_decay_names(model)
    optimizer = _optimizer(model, cfg, rt.device, no_decay)
    model, optimizer = rt.prepare(model, optimizer)
    val_loader = task.eval_loader(rt, val_ds, cfg.eval.micro_batch_size or t.micro_batch_size, tokenizer)
    # Stepped by hand once per optimizer step: a prepared scheduler steps once per
    # process, which would make the LR schedule depend on the world size.
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer, warmup, total_steps)
    rt.accelerator.register_for_checkpointing(scheduler)

    higher_is_better = cfg.eval_metric not in LOWER_IS_BETTER
    extra = {"launcher.json": json.dumps(task.metadata())}
    unwrapped = rt.unwrap(model)
    # LoRA on a pretrained base: checkpoints hold what trains (adapters, modules_to_save) and
    # the optimizer; the frozen base is read again from model.name on resume and by
    # `launcher export`. A random tiny base exists nowhere else, so it is saved whole.
    trainable_only = cfg.model.lora.enabled and not task.random_init()
    in_checkpoint = {"launcher.json": json.dumps(task.metadata() | (
        {"checkpoint_weights": "trainable", "base_model": cfg.model.name,
         "base_revision": hub.resolved_revision(cfg.model.name, cfg.model.revision)}
        if trainable_only else {"checkpoint_weights": "all"}))}
    skeleton = functools.partial(ckpt_lib.write_skeleton, model_config=unwrapped.config, tokenizer=tokenizer,
                                 extra_files=in_checkpoint, peft_config=getattr(unwrapped, "peft_config", {}).get("default"))
    checkpointer = ckpt_lib.Checkpointer(cfg.checkpoint, run_dir, rt, higher_is_better, skeleton, trainable_only)
    n_params, n_trainable, held = rt.parameter_counts(model)
    # Room for one more checkpoint, on every rank's view of the run directory, before any
    # step runs (and before a tracker run exists): a full disk found at the first save
    # would cost the steps before it.
    saved = n_trainable if trainable_only else n_params
    width = next(model.parameters()).element_size()
    checkpointer.need = ckpt_lib.check_space(rt, run_dir, sizing.checkpoint_bytes(saved, n_trainable, width))
    state = checkpointer.load(resume_from) if resume_from is not None else ckpt_lib.TrainState(tracker_ids=start.tracker_ids)
    config_changes.follow_schedule(scheduler, optimizer, changed, t.lr)
    if state.step >= total_steps and (run_dir / "model").is_dir():
        rt.print(f"{run_dir} already finished at step {state.step}; nothing to do")
        return {"status": "already_finished", "step": state.step, "run_dir": str(run_dir)}
    # metrics.jsonl keeps records up to the resumed step; a restart in place keeps none (-1).
    kept_step = state.step if resume_from else (-1 if start.restart_of_job else None)
    tracker = tracking.start_tracking(cfg, rt.is_main, rt.facts(), run_dir, state.tracker_ids, kept_step, warm_tracker)
    state.tracker_ids = tracker.ids()
    if resume_from is None:
        rt.on_main(ckpt_lib.record_owner, run_dir, rt.job_id, state.tracker_ids)
    notes, derived = task.describe(train_ds, val_ds)
    padded, padded_random = sampler.padded_fraction(), sampler.padded_fraction(grouped=False)
    derived |= {"derived.padded_token_fraction": round(padded, 4), "derived.padded_token_fraction_random": round(padded_random, 4)}
    notes.append(f"padding: {padded:.1%} of the tokens in {'length-grouped' if group else 'random'} micro-batches"
                 + (f" (random batches: {padded_random:.1%})" if group else ""))
    tracker.log_params(
        flatten(to_dict(cfg))
        | {
            "derived.world_size": rt.world_size,
            "derived.gradient_accumulation_steps": accumulation,
            "derived.steps_per_epoch": sampler.steps_per_epoch,
            "derived.total_steps": total_steps,
            "derived.warmup_steps": warmup,
            "derived.n_train": len(train_ds),
            "derived.n_validation": len(val_ds),
            "derived.n_parameters": n_params,
            "derived.n_trainable_parameters": n_trainable,
        }
        | derived
        | (config_changes.params(state.step, changed) if resume_from is not None else {})
    )
    if cfg.tracking.log_datasets:
        tracker.log_inputs(tracking.data_inputs(train_ds, val_ds))
    rt.print(
        f"{len(train_ds)} train / {len(val_ds)} validation rows, {n_params:,} parameters; "
        f"{total_steps} steps of {t.global_batch_size} examples "
        f"({t.micro_batch_size} x {accumulation} accumulation x {rt.world_size} ranks)"
    )
    if n_trainable != n_params:
        rt.print(f"LoRA: {n_trainable:,} of {n_params:,} parameters trainable ({n_trainable / n_params:.2%})")
    for line in notes:
        rt.print(line)
    if rt.zero_stage == 3 or rt.accelerator.is_fsdp2:
        engine = "ZeRO-3" if rt.zero_stage == 3 else "FSDP2"
        rt.print(f"{engine}: parameters held per rank: {' / '.join(f'{n:,}' for n in held)} of {n_params:,}")

    dog = watchdog.Watchdog(run_dir / "ranks", rt.rank, rt.world_size, t.hang_timeout_s, rt.print)
    dog.beat(state.step, "eval" if state.step == 0 and cfg.eval.at_start else "train")
    try:
        if state.step == 0 and cfg.eval.at_start:
            state.first_eval = task.evaluate(rt, model, dog.beating(val_loader, 0, "eval"))
            tracker.log_metrics({f"eval/{k}": v for k, v in state.first_eval.items()}, step=0)
            rt.print("step 0 eval: " + report.one_line(state.first_eval))
            _log_samples(rt, task, model, tokenizer, tracker, run_dir, 0)
        last_eval, last_eval_step = state.first_eval, 0
        stop_reason, stop_signal = None, None
        model.train()
        window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
        speed = _speedometer(cfg, rt, unwrapped.config, n_params, n_trainable)
        batches = batching.train_batches(train_ds, sampler, state.step, total_steps, collate, cfg.data.num_workers,
                                         pin_memory=rt.device.type == "cuda")
        first_step = state.step
        with rt.progress(total_steps, initial=state.step, every_s=cfg.tracking.print_every_s) as bar:
            for step, micro_batches in batches:
                lr = optimizer.param_groups[0]["lr"]
                # The step minimises the mean over the global batch's items (response tokens,
                # or examples / class weights): each micro-batch contributes its SUM of item
                # losses over the global item count, whatever its own size. The engines
                # average gradients over micro-batches and ranks, hence world x accumulation.
                items = _global_items(rt, [task.loss_items(b) for b, _ in micro_batches])
                scale = rt.world_size * accumulation / max(items, 1.0)
                step_loss = torch.zeros((), device=rt.device)
                grad_norm = None
                for k, (batch, n_tokens) in enumerate(micro_batches):
                    # Dropout masks depend on (seed, step, micro-batch within the global batch)
                    # only: a resumed run, and a run on any number of ranks, draw the same masks.
                    torch.manual_seed(_dropout_seed(t.seed, step, sampler.microbatch_index(k)))
                    batch = _to(batch, rt.device)
                    window_tokens += n_tokens  # real tokens, not padding
                    with rt.accelerator.accumulate(model):
                        loss_sum = task.loss_sum(model, batch)
                        rt.accelerator.backward(loss_sum * scale)
                        if rt.accelerator.sync_gradients:
                            grad_norm = rt.accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
                        optimizer.step()
                        optimizer.zero_grad()
                    step_loss += loss_sum.detach().float()
                faults.stall(step + 1)
                scheduler.step()
                state.step, state.epoch, state.metric_at_step = step + 1, sampler.epoch_of(step), None
                faults.point("step", state.step)
                dog.beat(state.step)
                window_steps += 1
                bar.update(1)
                if step == first_step:
                    rt.print(f"first optimizer step done {time.time() - launcher.STARTED:.1f} s after start")
                    rt.write_model_facts(run_dir, model, optimizer, no_decay)

                if state.step % cfg.tracking.log_every_steps == 0 or state.step == total_steps:
                    stats = torch.stack([step_loss, torch.tensor(float(window_tokens), device=rt.device)])
                    stats = rt.accelerator.reduce(stats.to(rt.device), reduction="sum")
                    dt = time.perf_counter() - window_t
                    values = {
                        "train/loss": float(stats[0]) / max(items, 1.0),  # the step's global mean
                        "train/lr": lr,
                        "train/samples_per_s": window_steps * t.global_batch_size / dt,
                        "train/tokens_per_s": float(stats[1]) / dt,
                        "train/step_time_s": dt / window_steps,
                        "train/epoch": state.epoch,
                    }
                    if grad_norm is not None:
                        values["train/grad_norm"] = float(grad_norm)
                    tracker.log_metrics(values, step=state.step)
                    rt.preemption.stepped(values["train/step_time_s"])
                    values |= speed(values["train/tokens_per_s"])
                    bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{lr:.1e}", tok_s=f"{values['train/tokens_per_s']:,.0f}",
                                    **({"mfu": f"{values['train/mfu']:.1%}"} if "train/mfu" in values else {}))
                    window_t, window_tokens, window_steps = time.perf_counter(), 0, 0

                last = state.step == total_steps
                if (cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0) or last:
                    dog.beat(state.step, "eval")
                    last_eval, last_eval_step = task.evaluate(rt, model, dog.beating(val_loader, state.step, "eval")), state.step
                    tracker.log_metrics({f"eval/{k}": v for k, v in last_eval.items()}, step=state.step)
                    stop_reason = _track_best(state, last_eval, cfg.eval_metric, higher_is_better, cfg.eval.early_stopping_patience)
                    rt.print(f"step {state.step} eval: " + report.one_line(last_eval))
                    _log_samples(rt, task, model, tokenizer, tracker, run_dir, state.step)
                if state.step == t.halt_at_step and not last:
                    stop_reason = stop_reason or "halt"
                signalled = rt.stop_requested()  # every rank, every step: they must agree on the step
                if signalled and not last:
                    stop_reason, stop_signal = stop_reason or "signal", signalled
                improved = state.best_step == state.step and cfg.checkpoint.export == "best"  # model/ may come from here
                if checkpointer.due(state.step) or last or stop_reason or improved:
                    tracker.flush(wait=True)
                    dog.beat(state.step, "checkpoint")
                    checkpointer.save(state)
                elif state.step % cfg.tracking.flush_every_steps == 0:
                    tracker.flush()
                dog.beat(state.step)
                if stop_reason:
                    break

        if stop_reason in ("halt", "signal"):
            why = "train.halt_at_step" if stop_reason == "halt" else stop_signal
            rt.print(f"stopped at step {state.step} ({why}); checkpoint saved; run the same command again to resume")
            tracker.finish(status="KILLED")
            return {"status": "halted" if stop_reason == "halt" else "stopped", "step": state.step, "run_dir": str(run_dir)}
        if stop_reason == "early_stop":
            rt.print(f"early stop at step {state.step}: no {cfg.eval_metric} improvement in {cfg.eval.early_stopping_patience} evals")

        if last_eval_step != state.step:  # resumed after the last step but before the export
            dog.beat(state.step, "eval")
            last_eval = task.evaluate(rt, model, dog.beating(val_loader, state.step, "eval"))
        exported_step, exported_eval = state.step, last_eval
        best = checkpointer.best(state)
        if best is not None:  # checkpoint.export: best (a collective: every rank loads its part)
            checkpointer.load(best)
            exported_step, exported_eval = state.best_step, state.best_eval
            rt.print(f"exporting the best evaluation's weights: step {exported_step} "
                     f"({cfg.eval_metric} {state.best_metric:.4f}; the last step, {state.step}, had {last_eval[cfg.eval_metric]:.4f})")
        tuned = task.tune(rt, model, dog.beating(val_loader, state.step, "eval"))  # eval.tune_threshold: the rule goes into launcher.json
        if tuned is not None:
            exported_eval = tuned
            rt.print(f"decision threshold tuned on validation: {task.threshold} "
                     f"({cfg.eval_metric} {tuned.get(cfg.eval_metric, float('nan')):.4f}; at 0.5: {tuned.get(cfg.eval_metric + '@0.5', float('nan')):.4f})")
            extra = {"launcher.json": json.dumps(task.metadata())}
        model_dir = run_dir / "model"
        dog.beat(state.step, "export")
        ckpt_lib.export_model(rt, model, tokenizer, model_dir, extra, random_base=task.random_init())
        summary = {"step": state.step, "before": state.first_eval, "after": exported_eval, "last": last_eval,
                   "exported_step": exported_step, "best_step": state.best_step, "best": state.best_metric}
        tracker.log_params({"exported.step": exported_step, f"exported.{cfg.eval_metric}": exported_eval.get(cfg.eval_metric)})
        rt.on_main(_write_outputs, run_dir, summary, tracker)
        if cfg.tracking.log_model:
            tracker.log_model(model_dir, exported_step, cfg.tracking.register_model)
        rt.print(report.final_table(state.first_eval, exported_eval))
        rt.print(f"exported:    step {exported_step} of {state.step} (checkpoint.export: {cfg.checkpoint.export})")
        if cfg.tracking.mlflow:
            rt.print(f"MLflow run:  {state.tracker_ids.get('mlflow', '-')} at {redact_uri(cfg.tracking_uri)}")
            if not cfg.tracking.uri:
                rt.print(f"  browse:    mlflow ui --backend-store-uri {cfg.tracking_uri}")
        rt.print(f"checkpoints: {run_dir / 'checkpoints'}")
        rt.print(f"model:       {model_dir}")
        tracker.finish()
        return {"status": "finished", "run_dir": str(run_dir), **summary}
    except BaseException as e:
        if not isinstance(e, (UserError, RunError, KeyboardInterrupt)):  # e.g. a collective that timed out
            watchdog.dump_exception(run_dir / "ranks", rt.rank, e)
        tracker.finish(status="FAILED")
        raise
    finally:
        dog.close()


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


def _speedometer(cfg: RunConfig, rt, model_config, n_params: int, n_trainable: int):
    """values(tokens per second, all ranks) -> MFU and peak GPU memory (CUDA only)."""
    from launcher import throughput

    if rt.device.type != "cuda":
        return lambda tokens_per_s: {}
    layers, hidden = throughput.model_shape(model_config)
    per_token = throughput.flops_per_token(n_params, n_trainable, layers, hidden, cfg.data.max_length)
    peak = throughput.peak_flops(torch.cuda.get_device_name(rt.device), cfg.train.precision, cfg.train.peak_tflops)

    def values(tokens_per_s: float) -> dict:
        out = {"train/gpu_mem_peak_gb": torch.cuda.max_memory_allocated(rt.device) / 2**30}
        if peak:
            out["train/mfu"] = per_token * tokens_per_s / (peak * rt.world_size)
        return out

    return values


def _global_items(rt, per_micro: list[float]) -> float:
    """Items (response tokens, examples, class weights) in this step's whole global batch."""
    local = torch.tensor([float(sum(per_micro))], dtype=torch.float64, device=rt.device)
    return float(rt.accelerator.reduce(local, reduction="sum")) if rt.world_size > 1 else float(local)


def _dropout_seed(seed: int, step: int, microbatch: int) -> int:
    return (seed * 1_000_003 + step) * 100_003 + microbatch


def _track_best(state, metrics: dict, metric: str, higher_is_better: bool, patience: int) -> str | None:
    value = metrics[metric]
    state.metric_at_step = value
    improved = state.best_metric is None or (value > state.best_metric if higher_is_better else value < state.best_metric)
    if improved:
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        state.best_eval = dict(metrics)
        return None
    state.evals_without_improvement += 1
    return "early_stop" if patience and state.evals_without_improvement >= patience else None


def _write_outputs(run_dir: Path, summary: dict, tracker) -> None:
    (run_dir / "final_metrics.json").write_text(json.dumps(summary, indent=1))
    tracker.flush()
    plot = report.plot_run(run_dir / "metrics.jsonl", summary["after"], run_dir / "training.png")
    for path in (run_dir / "config.yaml", run_dir / "final_metrics.json", plot):
        if path is not None and Path(path).is_file():
            tracker.log_artifact(path)
