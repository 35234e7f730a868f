"""A resume compares configs: what changed since the run directory's config.yaml, and whether
the change continues the same run or would make it another one.

Continuing the same run: keys that only change the future or how the same global batch is
split and watched (more steps or epochs, halt, micro-batch size, eval, checkpoint and
tracking cadence, timeouts, data workers and cache). They are accepted, listed in one block,
appended to RUN/config_history.jsonl and logged to the MLflow run, and config.yaml becomes
the new config.

Another run: the task, the model (name, size, LoRA, dtype, pooling, quantization), the data
(files, fields, length, packing, order), the seed, the global batch, the optimisation (lr,
schedule, warmup, decay, clipping, precision, class weights) and the metric that picks the
best checkpoint. Resuming with any of them changed trains a run
that neither config describes; refused in one line unless checkpoint.resume_changed=allow.

A longer schedule (train.max_steps or train.epochs raised) continues from the checkpoint's
step on the new schedule: the learning rate at step s is the new schedule's value at s
(the scheduler's closures are rebuilt from the config; only its step count is restored).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from launcher.files import write_atomically

# Another run when changed (prefixes match whole sections or keys).
# eval.metric too: the best checkpoint, its rotation and early stopping compare values of one metric.
RUN_DEFINING = ("task", "model.name", "model.tiny.", "model.lora.", "model.revision", "model.dtype", "model.pooling",
                "model.quantization", "data.", "train.lr", "train.weight_decay", "train.scheduler", "train.warmup_ratio",
                "train.warmup_steps", "train.global_batch_size", "train.max_grad_norm", "train.precision",
                "train.reduce_in_fp32", "train.seed", "train.class_weighting", "eval.metric")
# What the checkpoint's weights must fit: never changed from another run's checkpoint.
MODEL_SHAPE = ("task", "model.name", "model.tiny.arch", "model.tiny.hidden_size", "model.tiny.num_layers",
               "model.tiny.num_heads", "model.tiny.intermediate_size", "model.tiny.vocab_size", "model.lora.enabled",
               "model.lora.r", "model.lora.target_modules", "model.lora.modules_to_save", "model.lora.use_dora",
               "model.lora.layers_to_transform", "model.pooling", "model.quantization", "data.mode", "data.label_names")
# A tiny model's learned position table (BERT's, GPT-2's; a Llama's rotary positions have none)
# is sized from these (a causal LM's leaves room for its answers).
TINY_SHAPE = {"classification": ("data.max_length",), "causal_lm": ("data.max_length", "eval.max_new_tokens")}
# Sets written as lists: peft matches the names (and blocks) in any order. [q_proj, v_proj] then
# [v_proj, q_proj] was refused as weights that "do not load into this model".
UNORDERED = ("model.lora.target_modules", "model.lora.modules_to_save", "model.lora.layers_to_transform")
# Within data.: where and how fast the same rows are read.
DATA_PLUMBING = ("data.cache_dir", "data.cache_shared", "data.num_proc", "data.num_workers")
RUN_CONFIG = "config.yaml"  # beside a run, and in each checkpoint: the config it was written under
# Where, not what: never listed.
UNLISTED = ("output_dir", "run_name", "checkpoint.resume", "checkpoint.trust", "checkpoint.resume_changed")


def _defines_run(key: str) -> bool:
    if key.startswith(DATA_PLUMBING):
        return False
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RUN_DEFINING)


def changes(saved: Path, cfg) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(accepted, refused): key -> (was, now), against the config.yaml at `saved`."""
    from launcher.config import DATA_PATHS, flatten, load_config, to_dict
    from launcher.errors import ConfigError

    try:
        before = flatten(to_dict(load_config(saved, check_files=False, check_values=False, absolute_data=False)))
    except ConfigError:  # written by a launcher with other keys: nothing to compare against
        return {}, {}
    now = flatten(to_dict(cfg))
    moved = {}
    for key in (f"data.{k}" for k in DATA_PATHS):
        was, path = before.get(key), now.get(key)
        if not (isinstance(was, str) and was and isinstance(path, str) and path) or was == path:
            continue
        # A relative path or ~: recorded by a launcher that kept paths as typed, relative to a
        # directory it did not record. The same name from here is no change, as it was then;
        # another is shown as recorded (resolved from here, it would name a path the run never read).
        full = os.path.abspath(os.path.expanduser(was))
        if full == path or same_path(full, path):  # (a link, // or a trailing /: the same file)
            before[key] = path
        elif _same_contents(full, path):  # the data copied elsewhere (a job's scratch): the same rows
            moved[key] = (was, path)
            before[key] = path
    for key in UNORDERED:  # the same modules or blocks in another order: no change
        was, then = before.get(key), now.get(key)
        if isinstance(was, list) and isinstance(then, list) and set(map(str, was)) == set(map(str, then)):
            before[key] = then
    diff = {k: (before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys())
            if before.get(k) != now.get(k) and not k.startswith(UNLISTED)}
    refused = {k: v for k, v in diff.items() if _defines_run(k)}
    return {**{k: v for k, v in diff.items() if k not in refused}, **moved}, refused


def same_path(a: str | None, b: str | None) -> bool:
    """Two names of one file (a link, another spelling); False when either is unset or gone."""
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is gone, or a hub name
        return False


COMPARED_BYTES = 16 * 2**30  # a larger copy is not read through: it stays a change of data


def _same_contents(a: str, b: str) -> bool:
    """Two existing files, or folders (every file's relative name and bytes), with equal bytes:
    sizes first, so only a copy of equal size is read (a digest of each, in 1 MiB blocks)."""
    import hashlib

    def files(root: Path) -> list[tuple[str, Path]]:
        if root.is_file():
            return [("", root)]
        return sorted((str(p.relative_to(root)), p) for p in root.rglob("*") if p.is_file())

    try:
        left, right = files(Path(a)), files(Path(b))
        sizes = [p.stat().st_size for _, p in left]
        if not left or [n for n, _ in left] != [n for n, _ in right] or sizes != [p.stat().st_size for _, p in right]:
            return False
        if sum(sizes) > COMPARED_BYTES:  # (every rank reads both: minutes on a shared file system)
            return False
        from launcher.runtime import env_rank

        if env_rank() == 0:
            print(f"launcher: {b} is not the recorded {a}; comparing their {sum(sizes) / 2**20:,.0f} MiB byte for byte",
                  flush=True)

        def digest(path: Path) -> bytes:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return h.digest()

        return all(digest(p) == digest(q) for (_, p), (_, q) in zip(left, right))
    except OSError:
        return False


def describe(diff: dict) -> str:
    return ", ".join(f"{k}: {was!r} -> {now!r}" for k, (was, now) in diff.items())


def check_resume(cfg, checkpoint: Path | None, forked: bool = False) -> dict:
    """Before anything is built: the accepted changes of a resume in the run's own directory,
    or ConfigError (one line) for a change that makes it another run. A checkpoint of another
    run (checkpoint.resume=PATH outside the run directory) starts a new run from it: every
    change against the config it was written under is accepted (and followed: a new lr is the new
    schedule's from the next step)."""
    from launcher.errors import ConfigError

    if checkpoint is None:
        return {}
    # The config the checkpoint was written under (kept in it since 2026-12), else its run's:
    # RUN/config.yaml is this attempt's once the run directory is taken, so after a change
    # that was accepted but never checkpointed, only the checkpoint's own tells what it holds.
    written_in = Path(checkpoint).absolute().parent.parent  # RUN of RUN/checkpoints/step-N
    source = next((p for p in (Path(checkpoint) / RUN_CONFIG, written_in / RUN_CONFIG) if p.is_file()), None)
    if forked:
        if source is None:  # copied out of its run by a launcher that kept no config in it
            return {}
        accepted, refused = changes(source, cfg)
        shape = _shape_changes(cfg, {**accepted, **refused})
        if shape:
            raise ConfigError(f"checkpoint.resume: {checkpoint} was written with {describe(shape)}: its weights do not "
                              "load into this model; keep those values")
    else:
        own = Path(checkpoint).resolve().parent == (cfg.run_dir / "checkpoints").resolve()  # (a link to scratch too)
        if not own or source is None:
            return {}
        accepted, refused = changes(source, cfg)
        # (model.name aside: allowed, it is read as given, such as a base that moved)
        shape = {k: v for k, v in _shape_changes(cfg, {**accepted, **refused}).items() if k != "model.name"}
        if shape:  # even with resume_changed=allow, which offered it: a size-mismatch traceback
            raise ConfigError(f"checkpoint.resume: {cfg.run_dir} would resume from {Path(checkpoint).name} with "
                              f"{describe(shape)}: its weights do not load into this model; restore the values, or "
                              "choose a new --run-name")
        if refused and cfg.checkpoint.resume_changed != "allow":
            raise ConfigError(f"checkpoint.resume: {cfg.run_dir} would resume from {Path(checkpoint).name} with "
                              f"{describe(refused)}: that trains a run neither config describes; restore the values, "
                              "choose a new --run-name, or set checkpoint.resume_changed=allow")
    return dict(sorted({**accepted, **refused}.items()))


def _shape_changes(cfg, diff: dict) -> dict:
    """The changes a checkpoint's weights cannot load under (MODEL_SHAPE; a tiny model's
    position table too)."""
    from launcher.config import TINY_MODEL, tiny_learns_positions

    tiny = cfg.model.name == TINY_MODEL and tiny_learns_positions(cfg)
    fixed = MODEL_SHAPE + (TINY_SHAPE.get(cfg.task, ()) if tiny else ())
    return {k: v for k, v in diff.items() if k in fixed}


def check_restart(cfg, how: str) -> dict:
    """A run that ended before its first checkpoint (`how`: checkpoint.Start.ended, killed,
    interrupted or stopped before its first step) starts again in place, in its tracker run,
    only as the same run: another config under its name was refused before, as a run neither
    config describes, and is still (ConfigError, one line). Returns the accepted changes
    (listed, recorded and logged at step 0 as a resume's are: they were applied unsaid, and
    the tracker run kept the first attempt's values)."""
    from launcher.errors import ConfigError

    saved = cfg.run_dir / RUN_CONFIG
    accepted, refused = changes(saved, cfg) if saved.is_file() else ({}, {})
    if refused:
        raise ConfigError(f"run directory {cfg.run_dir} holds no complete checkpoint: its last attempt {how}, with "
                          f"another config ({describe(refused)}); pick another --run-name, or remove it to start this "
                          "config there")
    return dict(sorted(accepted.items()))


def lines(diff: dict, doing: str = "resuming") -> list[str]:
    """The changes of a resume (or a restart from step 0), as printed."""
    if not diff:
        return []
    return [f"{doing} with a changed config (config_history.jsonl):"] + [f"  {k}: {was!r} -> {now!r}" for k, (was, now) in diff.items()]


def record(run_dir: Path, step: int, diff: dict, cfg) -> None:
    """Rank 0, once the resumed run goes on (not one already finished, where nothing would
    follow them): the history line, and config.yaml made current."""
    import json
    import time

    from launcher.config import dump_yaml

    if not diff:
        return
    with open(run_dir / "config_history.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "resumed_at_step": step,
                            "changed": {k: [was, now] for k, (was, now) in diff.items()}}, default=str) + "\n")
    write_atomically(run_dir / "config.yaml", dump_yaml(cfg))


def follow_schedule(scheduler, optimizer, diff: dict, lr: float, weight_decay: float, always: bool = False) -> None:
    """After a resume with changes (`always`: from another run's checkpoint, whose config may
    have changed since): the next step's lr is the new config's schedule's, not the one the
    checkpoint restored into the optimizer (train.lr also replaces the peak the restored
    scheduler kept), and the decaying group's weight decay is the new config's (the optimizer's
    restored groups carry the old one; the second group never decays). Without a change the
    lr is the schedule's as well: equal to the restored one, unless the schedule's length moved
    with the data (rows added under checkpoint.resume_changed=allow, epochs counted)."""
    if "train.lr" in diff or always:
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * fn(scheduler.last_epoch)
    if "train.weight_decay" in diff or always:
        optimizer.param_groups[0]["weight_decay"] = weight_decay


def params(step: int, diff: dict, run_dir: Path | None = None) -> dict:
    """MLflow params of this attempt's changes (a resumed run's first values stay as logged),
    after those of every earlier attempt in run_dir's config_history.jsonl: an attempt that ran
    with its tracker off logged none of its own (a param logged already is not sent again)."""
    import json

    earlier: dict = {}
    history = run_dir / "config_history.jsonl" if run_dir is not None else None
    if history is not None and history.is_file():
        for line in history.read_text().splitlines():
            try:
                entry = json.loads(line)
                if entry["resumed_at_step"] > step:  # a history gone back from (checkpoint.resume=its own PATH)
                    continue
                earlier |= {f"resumed_at_{entry['resumed_at_step']}.{k}": f"{was!r} -> {now!r}"
                            for k, (was, now) in entry["changed"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):  # a line a kill cut short: the record it was
                continue
    return earlier | {f"resumed_at_{step}.{k}": f"{was!r} -> {now!r}" for k, (was, now) in diff.items()}
