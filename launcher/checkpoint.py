"""Checkpoints: save / rotate / find-latest / resume / export, and the run-directory policy.

A checkpoint is `checkpoints/step-NNNNNN/`: Accelerate's state (model, optimizer,
scheduler, RNG; per-rank shards under DeepSpeed) plus `trainer_state.json`
(step, epoch, tracker run ids, best metric). It is written into a hidden temp
directory and renamed into place only after every rank has finished and the
COMPLETE marker is written, so a crash never leaves a checkpoint that looks whole.
Every rank calls save/load/export: they are collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher import engines, faults, trust
from launcher.errors import ConfigError, RunError, UserError
from launcher.files import process_umask, write_atomically
from launcher.config_changes import RUN_CONFIG  # in a checkpoint: the run config it was written under
from launcher.owner import lease_holder, read_owner, started_from, went_back_to
from launcher.preemption import INTERRUPTED
from launcher.sizing import human_bytes
from launcher.trust import MARKER  # the seal: written last, and signed (trust.py)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Everything besides Accelerate's state that a resume needs; saved with every checkpoint."""

    step: int = 0
    epoch: float = 0.0  # epochs completed (as logged); the data order follows from step
    tracker_ids: dict = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    # The metric of the eval at this checkpoint's step, if one ran (for keep_best).
    metric_at_step: float | None = None
    first_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)  # every metric of the best evaluation
    # Who wrote the checkpoint: its shards only fit the same engine (and, sharded, the same
    # number of ranks). None in checkpoints from before they were recorded.
    world_size: int | None = None
    engine: str | None = None
    # Length-grouped epochs begin with their longest batch (data/batching.py) in runs that
    # record True; a checkpoint without the field resumes in the order it was written with.
    longest_batch_first: bool = False
    # The training examples the run read (after any dropped for length or left out by a cap;
    # packed or not): a file changed in place since would move every later step's batch. None in
    # checkpoints from before it was kept.
    train_rows: int | None = None
    # The validation rows it evaluated on, for the same check (None: from before it was kept).
    validation_rows: int | None = None

    @classmethod
    def read(cls, ckpt: Path) -> "TrainState":
        data = json.loads((ckpt / STATE_FILE).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def for_new_run(self, tracker_ids: dict) -> "TrainState":
        """The state a run started from another run's checkpoint goes on with: its step, epoch
        and batch order, but its own tracker runs and none of the other run's evaluations (no
        best to export, no step-0 evaluation, patience counted afresh)."""
        return dataclasses.replace(self, tracker_ids=dict(tracker_ids), best_metric=None, best_step=None, best_eval={},
                                   evals_without_improvement=0, metric_at_step=None, first_eval={})


def check_layout(ckpt: Path, state: "TrainState", rt) -> str | None:
    """Before loading: a checkpoint written by another engine, or sharded over another number
    of ranks by an engine whose shards are not resharded (engines.Engine.reshards_on_load), is
    one line (ConfigError); a full state, FSDP2 and ZeRO-1/2/3 shards written by another number
    of ranks load, and the line returned says how. The batch order and the global batch do not
    depend on the world size, so the run continues exactly."""
    if state.engine is None or state.world_size is None:
        return None
    engine = rt.engine.name
    if state.engine != engine:
        said = engines.Engine.layout_label
        raise ConfigError(f"{ckpt}: written by {said(state.engine)} on {state.world_size} rank(s); this launch is "
                          f"{said(engine)}: resume with the engine that wrote it (its accelerate config)")
    if state.world_size == rt.world_size:
        return None
    if not rt.engine.reshards_on_load:
        raise ConfigError(f"{ckpt}: {rt.engine.label} shards written by {state.world_size} rank(s) do not load on {rt.world_size} "
                          f"(resharding {rt.engine.label} shards is not supported): resume on {state.world_size} ranks")
    return (f"resuming step {state.step} written by {state.world_size} rank(s) on {rt.world_size}: {rt.engine.reshard_how}, and the batch "
            "order and global batch do not depend on the number of ranks")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint whose marker exists, oldest first."""
    return [(step, p) for step, p in _step_dirs(ckpt_root) if (p / MARKER).is_file() and not faults.hidden(step)]


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every entry named step-N, sealed or not, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name)))


def _root_of(folder: Path) -> Path:
    """A run directory's checkpoints/ folder, or the folder itself (given as that folder)."""
    return folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder


@dataclass
class Start:
    """Where a run starts: a checkpoint, or step 0 (in a new directory, or in place when an
    earlier attempt of the same scheduler job died before its first checkpoint)."""

    checkpoint: Path | None = None
    restart_of_job: str | None = None  # set: step 0 in place, continuing `tracker_ids`
    interrupted: bool = False  # step 0 in place too: the last attempt ended before its first checkpoint (Start.ended)
    killed: str = ""  # with interrupted: the last attempt was killed instead ("pid N on HOST", whose lease it left)
    stopped: str = ""  # with interrupted: how a stop asked before the first step ended it (RUN/INTERRUPTED says)
    tracker_ids: dict = field(default_factory=dict)
    # Another run's checkpoint (checkpoint.resume=PATH outside the run directory): this run
    # starts from it as a new run, with its own config.yaml, job.json and tracker run.
    forked_from: Path | None = None
    # What a killed attempt left half-written: never loaded, never counted for retention;
    # reported and removed once the run directory is taken.
    partial: list = field(default_factory=list)
    # One of the run's own checkpoints named by path (checkpoint.resume=PATH): the run goes
    # back to it, and job.json records that, so the same command again goes on from the
    # checkpoints this history writes after it.
    went_back: bool = False

    def ended(self) -> str:
        """With interrupted: how the last attempt ended, as the restart's lines say it."""
        return (f"was killed ({self.killed}) before its first checkpoint" if self.killed else self.stopped
                or "was interrupted (Ctrl-C) before its first checkpoint")


# How long ranks that see different checkpoints wait, one pause per try, for the shared file
# system to show them the same (NFS caches a directory's attributes up to 60 s by default).
AGREE_WAITS_S = (2, 5, 10, 20, 30)


def agreed_start(resolve, gather, say) -> Start:
    """resolve() on every rank until all ranks get the same answer. Each rank reads the run
    directory itself: on a shared file system whose cache lags on one node (NFS), that rank
    saw an older checkpoint, or none, and loaded another state than the others (or refused the
    run alone, leaving the rest waiting). gather: every rank's value, in rank order (a collective)."""
    waits = list(AGREE_WAITS_S)
    while True:
        refused: Exception | None = None
        try:
            start = resolve()
            seen = str(start.checkpoint) if start.checkpoint else "step 0"
        except (UserError, OSError, ValueError) as e:  # (any rank's failure must reach the collective too)
            refused, seen = e, f"refused: {e.problems[0] if isinstance(e, UserError) and e.problems else e}"
        views = gather(seen)
        if len(set(views)) == 1:
            if refused is not None:
                raise refused
            return start
        differ = "; ".join(f"rank {r}: {v}" for r, v in enumerate(views) if v != views[0])
        if not waits:
            raise ConfigError(f"checkpoint.resume: the ranks see different checkpoints (rank 0: {views[0]}; {differ}) "
                              f"after {sum(AGREE_WAITS_S)} s: every node must see the same run directory")
        wait = waits.pop(0)
        say(f"warning: the ranks see different checkpoints (rank 0: {views[0]}; {differ}); the shared file system "
            f"may not have caught up: looking again in {wait} s")
        time.sleep(wait)


def partial_writes(run_dir: Path) -> list[Path]:
    """Checkpoint directories without their marker (temp dirs of a save that never finished)
    and a half-written export."""
    root = run_dir / "checkpoints"
    found = [p for p in sorted(root.iterdir()) if p.is_dir() and not (p / MARKER).is_file()] if root.is_dir() else []
    return found + [p for p in (run_dir / "model.tmp",) if p.exists()]


def remove_partial(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str, job_id: str | None = None, trusted: bool = False) -> Start:
    """Where to start (_resolve), refusing in one line a checkpoint whose files were removed or
    changed size after its seal (trust.damaged): its load would fail half-way, with a traceback.
    Checkpoints sealed before markers listed their files (2026-12) are not checked."""
    start = _resolve(run_dir, resume, job_id, trusted)
    if start.checkpoint is not None and not trusted and (lost := trust.damaged(start.checkpoint)):
        shown = trust.listed(lost, "; ")
        mine = [p for _, p in complete_checkpoints(run_dir / "checkpoints")]
        if len(mine) > 1 and mine[-1] == start.checkpoint:
            advice = f"remove it to resume from {mine[-2].name}"
        elif mine and mine[-1] == start.checkpoint:
            advice = "restore its files, or start again under a new --run-name"
        else:
            advice = "restore its files, or name an intact checkpoint"
        raise ConfigError(f"checkpoint.resume: {start.checkpoint} lost files or changed their size after it was sealed "
                          f"({shown}), so it cannot be loaded as written; {advice} (or set checkpoint.trust=true to load "
                          "it as it is)")
    return start


def _resolve(run_dir: Path, resume: str, job_id: str | None = None, trusted: bool = False) -> Start:
    """Where to start. Never overwrites a run: a run directory without a complete checkpoint
    is refused, unless it belongs to this very scheduler job (`job_id`, e.g. a Slurm job
    requeued after a node died before the first checkpoint), which then starts again in place,
    as does a run that a second Ctrl-C, or a stop asked before its first step, ended before its
    first checkpoint (its INTERRUPTED mark)
    or that was killed then (its lease left by a launch that is gone: owner.lease_holder; the
    same run only: trainer.preflight compares the configs).
    A checkpoint named by path, outside the run directory, is loaded only if this user's
    launcher wrote it or `trusted` (checkpoint.trust) says so: loading it unpickles.

    Every rank calls this before any rank creates anything, so all decide alike.
    """
    if resume not in ("auto", "never"):
        return _resume_by_path(run_dir, resume, trusted)
    if not run_dir.exists():
        return Start()
    if resume == "never":
        raise ConfigError(
            f"run directory {run_dir} exists and checkpoint.resume=never; pick another --run-name or remove it"
        )
    latest = complete_checkpoints(run_dir / "checkpoints")
    if latest:
        return Start(checkpoint=latest[-1][1], partial=partial_writes(run_dir))
    owner = read_owner(run_dir)
    if job_id and owner.get("slurm_job_id") == job_id:
        return Start(restart_of_job=job_id, tracker_ids=owner.get("tracker_ids") or {}, partial=partial_writes(run_dir))
    if (run_dir / INTERRUPTED).is_file() and not owner.get("started_from"):  # (begun from a checkpoint: not step 0)
        how = (run_dir / INTERRUPTED).read_text(errors="replace")[:200].strip()
        return Start(interrupted=True, stopped=how, tracker_ids=owner.get("tracker_ids") or {},
                     partial=partial_writes(run_dir))
    holder, dead = lease_holder(run_dir, job_id)
    # Killed before its first checkpoint: nothing to resume and nothing kept but its records,
    # unless it left its best evaluation's weights (checkpoint.every_steps past where it got)
    # or began from another run's checkpoint (from scratch, it would be another run).
    if holder is not None and dead and not (run_dir / BEST).exists() and not owner.get("started_from"):
        return Start(interrupted=True, killed=f"pid {holder.get('pid')} on {holder.get('host')}",
                     tracker_ids=owner.get("tracker_ids") or {}, partial=partial_writes(run_dir))
    if holder is not None and not dead:
        raise ConfigError(f"run directory {run_dir} holds no complete checkpoint yet and a launch is in it (host "
                          f"{holder.get('host')}, pid {holder.get('pid')}): wait for it, or pick another --run-name")
    raise ConfigError(
        f"run directory {run_dir} exists but holds no complete checkpoint to resume; "
        "pick another --run-name or remove it"
    )


def _resume_by_path(run_dir: Path, resume: str, trusted: bool) -> Start:
    """checkpoint.resume=PATH. One of the run's own goes back to it; another run's starts this
    run from it (forked_from) in a new directory, and the same command again (a requeue) goes
    on from this run's own latest checkpoint, or starts again from PATH if it has none yet."""
    path = Path(resume)
    own = path.resolve().is_relative_to((run_dir / "checkpoints").resolve())
    record = None if own else started_from(run_dir, path)  # this run's job.json, when PATH is its source
    ours = record is not None
    mine = complete_checkpoints(run_dir / "checkpoints")
    if (ours or own and went_back_to(run_dir, path)) and mine:  # PATH itself may have been rotated away since
        return Start(checkpoint=mine[-1][1], partial=partial_writes(run_dir))
    if not (path / MARKER).is_file():
        raise ConfigError(f"checkpoint.resume: {resume}: not a complete checkpoint (no {MARKER} marker)")
    trust.require(path, trusted or own, "checkpoint.resume", "set checkpoint.trust=true")
    step = TrainState.read(path).step
    later = [p for s, p in mine if s >= step and p.resolve() != path.resolve()]
    if later:  # its saves would meet (and rotation would keep) another history's checkpoints
        raise ConfigError(f"checkpoint.resume: {resume} is step {step}, but {run_dir / 'checkpoints'} already holds "
                          f"{', '.join(p.name for p in later)}" + (", written after it: going back would write over "
                          "them" if own else ", of another history") + "; resume into another --run-name, or remove "
                          "those to go back")
    if own:
        return Start(checkpoint=path, went_back=True)
    if run_dir.exists() and not ours:
        raise ConfigError(f"checkpoint.resume: {resume} is another run's checkpoint, and {run_dir} already exists: "
                          "a run started from it needs a new --run-name")
    return Start(checkpoint=path, forked_from=path, tracker_ids=(record or {}).get("tracker_ids") or {},
                 partial=partial_writes(run_dir) if ours else [])


SKELETON = "skeleton"  # everything of an exported model/ but the weights, inside each checkpoint


class Checkpointer:
    def __init__(self, cfg, run_dir: Path, rt, higher_is_better: bool, write_skeleton=None, trainable_only: bool = False,
                 export_dtype: str = "float32", reads_masters: bool = False, run_config: str | None = None):
        self.cfg = cfg
        # The run's config as YAML, kept in each checkpoint (RUN_CONFIG): a run started from it
        # elsewhere is compared with the config that wrote it, wherever the checkpoint was copied.
        self.run_config = run_config
        self.export_dtype = export_dtype  # checkpoint.export_dtype, resolved
        # The export is read from DeepSpeed's fp32 masters (engines.Engine.export_reads_masters).
        self.reads_masters = reads_masters
        # export: best keeps the best evaluation as a checkpoint of that step where a snapshot
        # would not do: the masters are only in a checkpoint, and a LoRA checkpoint of what
        # trains is far smaller than the merged model. Else as a weights-only snapshot.
        self.best_in_checkpoint = reads_masters or trainable_only
        self.root = run_dir / "checkpoints"
        self.rt = rt
        self.higher_is_better = higher_is_better
        # write_skeleton(dir): model config, tokenizer, label names, so that
        # `launcher export` can turn the checkpoint into a model offline.
        self.write_skeleton = write_skeleton
        # Frozen parameters are left out of every checkpoint (LoRA on a pretrained base), as the
        # engine allows (engines.Engine.frozen_policy); loading is then non-strict on the model
        # weights only.
        self.trainable_only = trainable_only
        self.frozen = rt.engine.frozen_policy(trainable_only)
        self.save_kwargs, self.load_kwargs = self.frozen.save_kwargs or {}, self.frozen.load_kwargs or {}
        if self.frozen.save_hook:
            rt.accelerator.register_save_state_pre_hook(_drop_frozen)
        self.need = 0  # bytes one checkpoint takes (estimate_bytes), set once the model is built
        # The checkpoint this attempt last sealed or loaded: it holds the live weights' step
        # (its fp32 masters feed a wider DeepSpeed export).
        self.last: Path | None = None

    def _clear_tmp(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)

    def save(self, state: TrainState) -> Path:
        final = self.root / step_dir_name(state.step)
        if self.last is not None and final.resolve() == self.last.resolve():
            return final  # already saved (or loaded) at this step: a periodic save == the last step
        # (No other sealed checkpoint of this step can be here: a resume by path into a run
        # directory holding checkpoints of that step or later is refused, resolve_resume.)
        started = time.monotonic()
        tmp = self.root / f".tmp-{final.name}"
        self.rt.on_main(self._clear_tmp, tmp)
        # Every rank writes its part, then they compare notes (a collective, so a rank whose
        # write failed cannot leave the others waiting in a barrier); rank 0 seals.
        def write():
            faults.save_error(state.step)
            with frozen_left_out(self.rt.accelerator._models if self.frozen.state_dict_hooks else []):
                self.rt.accelerator.save_state(str(tmp), **self.save_kwargs)
            sync_tree(tmp)  # this node's writes (another node's shards are clean here: cheap)

        failure = _attempt(write, self.root, self.need)
        if failure is not None and failure[1] and self.rt.world_size > 1 and self.rt.engine.save_collectives:
            # Out of disk on this rank, inside an engine whose save has collectives: the others
            # may wait in them (DeepSpeed's closing barrier), and comparing notes met that
            # barrier with another collective (a hang, or a crash). This rank says it in one
            # line and stops; its exit stops the job. The temp dir, never sealed, stays (other
            # ranks may still write into it) until the next start removes it (partial_writes).
            self._give_up(state.step, [None] * self.rt.rank + [failure[0]], None)
        if failure is not None and not failure[1]:
            # Not for want of disk: the engine's save failed on this rank. The other ranks may
            # still be inside its collectives (DCP gathers between phases), where comparing
            # notes would leave every rank waiting until the collective timeout. This rank stops
            # now and its exit stops the job; the temp dir is never sealed, so never resumed from.
            raise failure[2]
        failures = self.rt.gather_objects(failure and failure[0])
        if not any(failures):
            faults.point("checkpoint", state.step)
            failure = _attempt(lambda: self._seal(tmp, final, state), self.root, self.need) if self.rt.is_main else None
            failures = self.rt.gather_objects(failure and failure[0])
        if any(failures):
            self.rt.on_main(shutil.rmtree, tmp, True)
            self._give_up(state.step, failures, failure)
        if self.rt.is_main:  # after the seal's verdict: an old checkpoint that will not go is no failed save
            self._rotate()
        if self.rt.preemption is not None:
            self.rt.preemption.saved(state.step, time.monotonic() - started)
        self.last = final
        return final

    def _give_up(self, step: int, failures: list, own) -> None:
        """A checkpoint that could not be written: the previous complete checkpoint is untouched
        and the temp dir is never sealed (gone here, or removed at the next start). A disk error becomes one line; anything else keeps its traceback."""
        rank, what = next((r, f) for r, f in enumerate(failures) if f)
        kept = complete_checkpoints(self.root)
        kept_line = (f"the last complete checkpoint, {kept[-1][1].name}, is intact; free space and run the same "
                     "command to resume from it") if kept else "no earlier checkpoint exists"
        if own is not None and not own[1]:  # this rank failed, and not for want of disk
            raise own[2]
        raise RunError(f"checkpoint at step {step} not written: rank {rank}: {what}; {kept_line}")

    def _seal(self, tmp: Path, final: Path, state: TrainState) -> None:
        state.world_size, state.engine = self.rt.world_size, self.rt.engine.name
        if self.write_skeleton is not None:
            self.write_skeleton(tmp / SKELETON)
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
        if self.run_config is not None:
            (tmp / RUN_CONFIG).write_text(self.run_config)
        readable_weights(tmp)
        (tmp / MARKER).write_text(trust.sign(tmp))  # last: every file is in, and signed (trust.py)
        sync_tree(tmp)  # on disk before the name says COMPLETE (each rank synced its own part too)
        if final.exists():  # an incomplete leftover from a crash at this step
            shutil.rmtree(final)
        tmp.rename(final)
        sync_dir(self.root)  # before rotation removes an older one
        (self.root.parent / INTERRUPTED).unlink(missing_ok=True)  # a checkpoint now resumes it

    def _rotate(self) -> None:
        """Rank 0, once a save is sealed: the checkpoints keep_last and keep_best leave go. Each
        loses its marker first, so a kill while its files go (rmtree's order is the file
        system's) leaves a directory nothing counts as a checkpoint, which the next start
        removes (partial_writes). A removal that fails (a busy file on NFS) is one line: the
        new checkpoint is written, and the run goes on."""
        ckpts = complete_checkpoints(self.root)
        keep = {step for step, _ in ckpts[-self.cfg.keep_last :]}
        if self.cfg.keep_best or (self.cfg.export == "best" and self.best_in_checkpoint):
            scored = []
            for step, path in ckpts:
                try:
                    m = TrainState.read(path).metric_at_step
                except (OSError, ValueError):  # unreadable: never the best (and resume refuses it)
                    continue
                if m is not None and math.isfinite(m):  # a NaN would win every max() it comes first in
                    scored.append((m if self.higher_is_better else -m, -step))
            if scored:  # best metric; among equals the earliest, as the best-step bookkeeping does
                keep.add(-max(scored)[1])
        for step, path in ckpts:
            if step not in keep:
                try:
                    (path / MARKER).unlink(missing_ok=True)
                    shutil.rmtree(path)
                except OSError as e:
                    self.rt.print(f"warning: could not remove {path} (keep_last/keep_best): {e}; remove it by hand")
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def best(self, state: TrainState) -> Path | None:
        """The kept checkpoint of the best evaluation, when export is best and it is not the
        final step (then the live weights are the best already)."""
        if self.cfg.export != "best" or state.best_step is None or state.best_step == state.step:
            return None
        path = self.root / step_dir_name(state.best_step)
        return path if (path / MARKER).is_file() else None

    def resume_from(self, path: Path) -> TrainState:
        """load() of the checkpoint the run starts from: one that its run rotates away meanwhile
        (another run's, named by checkpoint.resume) is one line, not the reader's traceback."""
        faults.point("load")
        try:
            return self.load(path)
        except Exception as e:
            if not (path / MARKER).is_file():
                raise ConfigError(removed_meanwhile(path, "this run loaded it")) from e
            raise

    def load(self, path: Path) -> TrainState:
        state = TrainState.read(path)
        if self.frozen.check_saved:
            _check_trainable_saved(path, self.rt.accelerator._models)
        if state.world_size is not None and state.world_size != self.rt.world_size and self.rt.engine.converts_to_universal:
            self._load_universal(path, state.world_size)  # (check_layout refused what cannot load here)
        else:
            with frozen_left_out(self.rt.accelerator._models if self.frozen.state_dict_hooks else []):
                self.rt.accelerator.load_state(str(path), **self.load_kwargs)
        if self.rt.preemption is not None:
            self.rt.preemption.saved(state.step)
        self.last = path
        return state

    def _load_universal(self, path: Path, world: int) -> None:
        """ZeRO shards of another world size: rank 0 converts them into RUN/universal/STEP
        (engines.universal_view; whatever a killed attempt left there is removed first) while the
        others wait on the file system (main_writes_others_wait); every rank loads it; rank 0
        removes it once every rank has (the next checkpoint is written at this world size)."""
        universal = self.root.parent / "universal"
        view = universal / path.name
        acc = self.rt.accelerator

        def convert():
            shutil.rmtree(universal, ignore_errors=True)
            universal.mkdir(parents=True, exist_ok=True)
            # Checked first: a conversion that fills the disk would fill it for the run's next
            # checkpoint too (a refusal frees what a killed attempt left, above).
            trained = sum(1 for p in acc._models[0].parameters() if p.requires_grad)
            need = engines.universal_need(path, self.rt.engine, trained, world)
            free = shutil.disk_usage(universal).free
            if free < need:
                shutil.rmtree(universal, ignore_errors=True)
                raise RunError(f"{path}: converting its ZeRO shards to a universal checkpoint needs about "
                               f"{human_bytes(need)} free in {universal.parent} but {human_bytes(free)} is free; free "
                               f"some space, or run on {world} rank(s), where it needs no conversion")
            self.rt.print(f"converting {path.name}'s ZeRO shards to a universal checkpoint ({universal})")
            try:
                engines.universal_view(path, view)
            except Exception as e:
                shutil.rmtree(universal, ignore_errors=True)  # nothing half-written stays
                said = " ".join(str(e).split())[:300] or type(e).__name__
                raise RunError(f"{path}: converting its ZeRO shards to a universal checkpoint failed: {said}") from None

        main_writes_others_wait(self.rt, convert, self.root.parent, f"the universal checkpoint of {path.name}")
        with engines.universal_load(acc._models[0], acc._optimizers[0]):
            acc.load_state(str(view), **self.load_kwargs)
        self.rt.barrier()  # every rank has read its RNG state and the scheduler through the view's links
        self.rt.on_main(shutil.rmtree, universal, ignore_errors=True)


@contextlib.contextmanager
def frozen_left_out(models):
    """FSDP2: the frozen parameters leave each model's state dict while accelerate saves or
    loads a checkpoint. accelerate's DCP save and load take no filter (and no non-strict
    load), but both build the dict with model.state_dict() and end in model.load_state_dict():
    a state-dict hook drops the frozen entries, so DCP writes and reads only what trains, and
    a load hook forgives exactly those keys as missing (a missing trained weight still fails)."""
    handles = []
    for model in models:
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}

        def drop(_module, state_dict, _prefix, _meta, frozen=frozen):
            for name in frozen & state_dict.keys():
                del state_dict[name]

        def forgive(_module, incompatible, frozen=frozen):
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]

        handles += [model.register_state_dict_post_hook(drop), model.register_load_state_dict_post_hook(forgive)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _drop_frozen(models, weights, output_dir) -> None:
    """accelerate's save pre-hook: each model's state dict without its frozen parameters
    (buffers stay: they are small and some are not re-derived on load), nor the extra state
    a quantized frozen layer writes beside its weight (NF4: WEIGHT.absmax, .quant_map, ...;
    int8: LAYER.SCB, .weight_format): the base is quantized again, identically, from the
    model source at load."""
    for model, state in zip(models, weights):
        params = dict(model.named_parameters(remove_duplicate=False))  # tied aliases too
        frozen_layers = set()
        for name, param in params.items():
            if not param.requires_grad:
                state.pop(name, None)
                frozen_layers.add(name.rpartition(".")[0])
        buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
        for key in [k for k in state if k not in params and k not in buffers]:  # extra state: a quantized layer's
            parts = key.split(".")
            if any(".".join(parts[:i]) in frozen_layers for i in range(1, len(parts))):
                del state[key]


def _check_trainable_saved(ckpt: Path, models) -> None:
    """A non-strict load must still find every trainable parameter in the checkpoint."""
    from safetensors import safe_open

    for i, model in enumerate(models):
        path = ckpt / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not path.is_file():
            continue
        with safe_open(str(path), framework="pt") as f:
            saved = set(f.keys())
        lacking = [n for n, p in model.named_parameters() if p.requires_grad and n not in saved]
        if lacking:
            raise RunError(f"{ckpt}: lacks trained weights {', '.join(lacking[:3])}; it was not written by this run's model")


def _attempt(write, root: Path, need: int) -> tuple[str, bool, BaseException] | None:
    """None when write() succeeds; else (a one-line description, a disk error?, the exception).
    torch.save's zip writer reports a full disk as a RuntimeError ("file write failed",
    "iostream error", "unexpected pos"), so a failure with less free space left than a
    checkpoint needs counts as a full disk too."""
    try:
        write()
        return None
    except Exception as e:  # noqa: BLE001 - the caller reports it and re-raises what is not a disk error
        line = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if isinstance(e, OSError):
            return line, True, e
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            free = None
        if free is not None and free < need:
            return f"out of disk space ({human_bytes(free)} free, about {human_bytes(need)} needed; {line})", True, e
        return line, False, e


def check_writable(out_dir: Path) -> None:
    """ConfigError when files cannot be created where the run would write (a read-only file
    system, no permission), probed with a temp file in output_dir or its nearest existing
    parent, so nothing is created or left behind."""
    import tempfile

    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return  # a file in the way: load_config reports that
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".launcher-write-probe-"):
            pass
    except OSError as e:
        at = "" if probe == out_dir else f" (at {probe})"
        raise ConfigError(f"output_dir: {out_dir} cannot be written{at}: {e.strerror or e}") from None


def check_space(rt, run_dir: Path, need: int) -> int:
    """ConfigError on every rank when any rank's file system has less free space at the run
    directory than one checkpoint needs (a collective: they all stop or none does)."""
    free = shutil.disk_usage(run_dir).free
    views = rt.gather_objects((free, rt.rank)) if rt.world_size > 1 else [(free, rt.rank)]
    least, rank = min(views)
    if least < need:
        where = f" (as rank {rank} sees it)" if rt.world_size > 1 else ""
        raise ConfigError(f"output_dir: a checkpoint of this run takes about {human_bytes(need)} but {run_dir}{where} has "
                          f"{human_bytes(least)} free; free some space or point --output-dir elsewhere")
    return need


def write_skeleton(out_dir: Path, model_config, tokenizer, extra_files: dict[str, str], peft_config=None) -> None:
    """config.json, tokenizer files and our metadata: an HF model directory minus its weights
    (plus adapter_config.json for LoRA runs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config.save_pretrained(out_dir)
    if peft_config is not None:
        peft_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for name, text in extra_files.items():
        (out_dir / name).write_text(text)


NO_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}  # fsync unsupported here


def sync_dir(path: Path) -> None:
    """fsync a directory: the names created, renamed or removed in it survive a crash. Some
    file systems refuse it (EINVAL on a few network ones): what they do is what there is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file under root, then its directories. Before a rename seals a checkpoint or
    an export: a crash of the node (not just the process) can otherwise keep the rename, which
    the file system journals, and lose data still in the page cache: a checkpoint marked
    COMPLETE with empty shards, once older ones were rotated away. (torch.distributed.checkpoint's
    writer syncs its files for the same reason.)"""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                if os.path.islink(path):
                    continue
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # another rank's engine renamed its temp file meanwhile
                continue
            try:
                os.fsync(fd)
            except OSError as e:
                # A file system that cannot sync (EINVAL, ENOTSUP from some FUSE and network
                # mounts) does what it does (every save there used to fail as a full disk).
                if e.errno not in NO_FSYNC:
                    raise
            finally:
                os.close(fd)
        sync_dir(Path(dirpath))


def readable_weights(root: Path) -> None:
    """safetensors (0.8) creates its files 0600 whatever the umask: in an export or a checkpoint
    the weights were the one file a teammate (the group, under a umask of 002 or 022) could not
    read, while config and tokenizer files could. They get the mode every other file gets."""
    mode = 0o666 & ~process_umask()
    if mode == 0o600:
        return
    for path in root.rglob("*.safetensors"):
        if not path.is_symlink() and path.is_file() and path.stat().st_mode & 0o777 == 0o600:
            os.chmod(path, mode)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """tmp becomes out_dir, its files on disk first (sync_tree). An out_dir being replaced is
    moved aside to out_dir.old first and removed last, so a complete copy exists at every
    moment under one of the two names."""
    readable_weights(tmp)
    sync_tree(tmp)
    if not out_dir.exists():
        tmp.rename(out_dir)
        sync_dir(out_dir.parent)
        return
    old = out_dir.with_name(out_dir.name + ".old")  # (best_snapshot also looks here)
    shutil.rmtree(old, ignore_errors=True)
    out_dir.rename(old)
    tmp.rename(out_dir)
    sync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def export_model(rt, model, tokenizer, out_dir: Path, extra_files: dict[str, str], random_base: bool = False,
                 dtype: str = "float32", masters: Path | None = None, snapshot: dict | None = None,
                 base_name: str | None = None) -> None:
    """The final model in Hugging Face format (safetensors, in `dtype`) with tokenizer and label
    names; for LoRA runs also adapter/ (and base/ when the base was randomly initialised).

    `get_state_dict` gathers the full weights (a collective under ZeRO-3/FSDP), so
    every rank calls it; rank 0 writes into a temp dir and renames it into place. With
    `masters` (the same on every rank: engines.Engine.export_reads_masters) rank 0 reads the
    fp32 master weights from that checkpoint instead, as `launcher export` does.

    The final export is the run's last use of the model: a LoRA export merges the adapters
    into the gathered tensors in place (lora.write: no second copy), and without ZeRO-3 those
    are the live model's own weights. A `snapshot` (the best evaluation's, mid-run: tensors
    to keep beside it, by file name) leaves them alone, and training goes on.
    """
    from launcher import quantization
    from launcher.tasks import lora

    # A quantized base (one process: engines.model_problems) is exported dequantized: its live
    # weights as float32, so the merged model is plain (quantization.py).
    quantized = quantization.is_quantized(rt.unwrap(model))
    gathered = (None if masters is not None else quantization.dequantized_state_dict(rt.unwrap(model)) if quantized
                else rt.accelerator.get_state_dict(model))
    fault = "export" if snapshot is None else "best"
    # A LoRA snapshot is taken only on a random base (a pretrained base's best is a checkpoint
    # of what trains: Checkpointer.best_in_checkpoint), which lora.write merges on a copy.
    assert snapshot is None or random_base or not lora.is_peft(rt.unwrap(model))

    def write():
        from safetensors.torch import save_file

        unwrapped = rt.unwrap(model)
        state_dict = retie(unwrapped, cast_floats(gathered if gathered is not None else engines.merged_weights(masters)[0], dtype))
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        config = quantization.plain_config(unwrapped.config) if quantized else unwrapped.config
        if lora.is_peft(unwrapped):
            base = unwrapped.get_base_model()
            with rt.model_init(random_weights=True):  # a whole copy on rank 0, not a ZeRO-3 partition
                lora.write(unwrapped.peft_config["default"], state_dict, tmp, config, type(base), random_base, dtype=dtype,
                           base_name=base_name)
        else:
            canonical_key_names(unwrapped)
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        write_skeleton(tmp, config, tokenizer, extra_files)
        _for_inference(tmp)
        for name, tensors in (snapshot or {}).items():
            save_file(tensors, str(tmp / name))
        _record_dtype(tmp, dtype)
        faults.stall(fault)
        faults.point(fault)
        replace_dir(tmp, out_dir)

    main_writes_others_wait(rt, write, out_dir.parent, "the export" if snapshot is None else "the best snapshot")


# ---------------------------------------------------------------- the best evaluation's snapshot

BEST = "best"  # RUN/best: the best evaluation's weights only, as an export (checkpoint.export: best)
BEST_FILE = "best.json"  # in it: the step; beside it EVAL_OUTPUTS, what a decision rule is tuned on
EVAL_OUTPUTS = "eval_outputs.safetensors"


def best_snapshot(run_dir: Path, step: int | None, dtype: str, outputs_needed: bool) -> Path | None:
    """RUN/best when it holds the weights of `step` in `dtype` (a resume may have changed
    checkpoint.export_dtype) and, when a threshold is tuned, the outputs to tune it on."""
    for snap in (run_dir / BEST, run_dir / (BEST + ".old")):  # .old: killed between replace_dir's renames
        try:
            held = json.loads((snap / BEST_FILE).read_text())
        except (OSError, ValueError):
            continue
        fits = isinstance(held, dict) and step is not None and held.get("step") == step and held.get("export_dtype") == dtype
        if fits and (not outputs_needed or (snap / EVAL_OUTPUTS).is_file()):
            return snap
    return None


def remove_best(run_dir: Path) -> None:
    """RUN/best and what a killed replace left beside it, at a run's end that did not export
    from it (a snapshot that became model/ stays: hard links, and a later extension of the
    run exports it again if nothing beats it)."""
    for name in (BEST, BEST + ".tmp", BEST + ".old"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def snapshot_outputs(snap: Path) -> dict | None:
    """The evaluation outputs kept beside a snapshot (None when the task keeps none)."""
    from safetensors.torch import load_file

    return load_file(str(snap / EVAL_OUTPUTS)) if (snap / EVAL_OUTPUTS).is_file() else None


def adopt_snapshot(snap: Path, model_dir: Path, launcher_json: str) -> None:
    """Rank 0: model/ becomes the snapshot (hard links, no copy of the weights; a copy where the
    file system has none), with launcher.json as the run ends it (a tuned threshold)."""
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(snap, tmp, copy_function=link)
    for name in (BEST_FILE, EVAL_OUTPUTS):
        (tmp / name).unlink(missing_ok=True)
    (tmp / "launcher.json").unlink()  # a link to the snapshot's: written anew, not through it
    (tmp / "launcher.json").write_text(launcher_json)
    faults.stall("export")
    faults.point("export")
    replace_dir(tmp, model_dir)  # RUN/best stays (remove_best)


def cast_floats(state_dict: dict, dtype: str) -> dict:
    """The floating-point tensors in `dtype` (in place of the dict's entries; others as they are)."""
    import torch

    target = getattr(torch, dtype)
    done: dict = {}  # tied weights (one storage under two names) stay one tensor after the cast
    for k, v in state_dict.items():
        if torch.is_tensor(v) and v.is_floating_point() and v.dtype != target:
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
            if key not in done:
                done[key] = v.to(target)
            state_dict[k] = done[key]
    return state_dict


def _for_inference(model_dir: Path) -> None:
    """The key/value cache on again in an export's config.json and generation_config.json (and
    base/'s): training turns it off (tasks/modeling.finish, where it was on), and an export that
    kept it off generated without it in plain transformers, several times slower per token."""
    for folder in (model_dir, model_dir / "base"):
        for name in ("config.json", "generation_config.json"):
            path = folder / name
            if not path.is_file():
                continue
            config = json.loads(path.read_text())
            if config.get("use_cache") is False:
                config["use_cache"] = True
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _record_dtype(model_dir: Path, dtype: str) -> None:
    """config.json says the dtype the weights are in (save_pretrained writes the live model's)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main_writes_others_wait(rt, write, where: Path, what: str) -> None:
    """Rank 0 runs write(); the other ranks wait on the shared run directory, not in a
    collective, so a long write (merging a 70B LoRA export takes many minutes) cannot run
    into the process group's timeout. A failure on rank 0 stops the others with its message."""
    import time

    if rt.world_size == 1:
        write()
        return
    token = rt.shared_token()
    done, failed = where / f".done-{token}", where / f".failed-{token}"
    if rt.is_main:
        try:
            write()
        except BaseException as e:
            try:
                # whole or not at all: a waiting rank that sees the file reads all of it
                write_atomically(failed, f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}")  # (two paths fit)
            except OSError:  # a full disk: an empty note still stops the others now (rank 0's error is reported)
                with contextlib.suppress(OSError):
                    failed.touch()
            raise
        done.write_text("")
    else:
        started = last_word = time.monotonic()
        while not done.exists():
            if failed.exists():
                raise RunError(f"rank 0 could not write {what}: {failed.read_text()}")
            if time.monotonic() - last_word > 60:
                print(f"rank {rt.rank}: waiting {time.monotonic() - started:.0f} s for rank 0 to write {what}", flush=True)
                last_word = time.monotonic()
            time.sleep(0.5)
    rt.barrier()  # every rank has seen it: now quick
    if rt.is_main:
        done.unlink(missing_ok=True)


def retie(model, state_dict: dict) -> dict:
    """Parameters the live model shares under several names (tied input and output embeddings)
    become one tensor again in `state_dict`, so the export writes them once under the first
    name, as save_pretrained does for a model in one process. The state dicts FSDP2 gathers and
    DeepSpeed's fp32 masters hold a copy per name: the export then held `lm_head.weight`
    beside the embeddings (SmolLM2 under ZeRO-2 and FSDP2). Copies that differ stay apart."""
    import torch

    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():
        held = [n for n in group if n in state_dict]
        for n in held[1:]:
            if state_dict[n] is not state_dict[held[0]] and torch.equal(state_dict[n], state_dict[held[0]]):
                state_dict[n] = state_dict[held[0]]
    return state_dict


def canonical_key_names(model) -> None:
    """Save under the model class's own key names, whatever the engine. transformers reverses
    the renames it applied at load time when it saves; its ZeRO-3 load path records every
    rename it knows instead of those that matched (transformers 5.23), so a ZeRO-3 export of
    a BERT wrote LayerNorm `gamma`/`beta` where one process writes `weight`/`bias`. Keep the
    renames that were really used (none, when the engine does not say)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if getattr(c, "was_used", lambda: False)()]


# ---------------------------------------------------------------- offline export


def base_weights(ckpt: Path) -> dict | None:
    """The local base a LoRA checkpoint holding only what trained was written over
    (models.local_weights, in its skeleton's launcher.json); None for any other checkpoint."""
    try:
        meta = json.loads((ckpt / SKELETON / "launcher.json").read_text())
    except (OSError, ValueError):
        return None
    recorded = meta.get("base_weights") if isinstance(meta, dict) and meta.get("checkpoint_weights") == "trainable" else None
    return recorded if isinstance(recorded, dict) else None


def _base_as_read(meta: dict) -> str:
    """Where the LoRA run's local base is now: model.name as the run gave it, or (a relative
    name, exported from another directory) the absolute path it was read from, whichever
    holds the same weights (models.local_weights); neither: one line, never a merge onto
    another model. A hub base (its revision pins it) or a checkpoint from before the record:
    model.name, unchecked."""
    from launcher import models

    recorded = meta.get("base_weights") or {}
    return models.same_base(meta["base_model"], recorded, "launcher export", "put that base back where the run read it",
                            also=recorded.get("path"))


def _pretrained_base(auto, meta: dict, config, code: dict):
    """The LoRA run's pretrained base, built with the run's own config (labels, head size);
    a quantized base (QLoRA) as the plain model of its dequantized weights."""
    from launcher import models, quantization

    if meta.get("base_quantization"):
        return quantization.load_dequantized(auto, meta["base_model"], meta["base_quantization"], meta["base_dtype"],
                                             config, revision=meta.get("base_revision"), **code)
    if models.gguf_source(meta["base_model"]) is not None:  # read (dequantized) from the GGUF file itself
        return models.from_pretrained(auto, meta["base_model"], config=config, ignore_mismatched_sizes=True)
    try:
        return models.from_pretrained(auto, meta["base_model"], revision=meta.get("base_revision"), config=config,
                                      ignore_mismatched_sizes=True, **code)
    except ConfigError as e:
        raise ConfigError(f"{meta['base_model']}: the frozen base of this LoRA checkpoint cannot be loaded "
                          f"({e.problems[0][:200]}); put it there (or HF_HUB_OFFLINE=0 for a hub name)") from None


def _export_lora(skeleton: Path, tmp: Path, auto, config, code: dict, meta: dict, state_dict: dict, dtype) -> str:
    """A LoRA checkpoint's export (adapter/, the merged model): the frozen base read again from
    where the run read it when the checkpoint holds only what trained. Says what it added."""
    import torch
    from peft import PeftConfig

    from launcher import models
    from launcher.tasks import lora

    with torch.device("meta"):  # only its class is wanted (remote code resolves it): no weights made
        model_class = type(models.from_config(auto, config, **code))
    base, source = None, ""
    if meta.get("checkpoint_weights") == "trainable":
        meta = meta | {"base_model": _base_as_read(meta)}
        base = _pretrained_base(auto, meta, config, code)
        source = f", frozen base from {meta['base_model']}"
    lora.write(PeftConfig.from_pretrained(str(skeleton)), state_dict, tmp, config, model_class, meta.get("random_base", False),
               base=base, dtype=dtype, base_name=meta.get("base_model"))
    return source + ", LoRA: adapter/ and merged model"


def _export_whole(ckpt: Path, tmp: Path, auto, config, code: dict, state_dict: dict, dtype) -> None:
    import torch

    from launcher import models

    model = models.from_config(auto, config, **code)
    if dtype:
        model.to(getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # A tied weight (GPT-2's, Qwen2's lm_head) is saved once by accelerate's safetensors writer;
    # it is filled all the same when it shares its tensor with one that was loaded.
    tensors = model.state_dict(keep_vars=True)
    loaded = {tensors[k].data_ptr() for k in state_dict if k in tensors}
    missing = [k for k in missing if tensors[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ConfigError(f"{ckpt}: its weights do not fit the model in {SKELETON}/config.json: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(tmp, safe_serialization=True)
    if dtype:
        _record_dtype(tmp, dtype)


def _untuned_rule(model_dir: Path, ckpt: Path, meta: dict) -> str:
    """A checkpoint is sealed before a run tunes its cut (eval.tune_threshold: once, at the
    run's end, into RUN/model/launcher.json), so its export holds the 0.5 rule and says
    threshold_tuned: false, whatever an older launcher's skeleton claimed. `meta` is the
    skeleton's launcher.json, copied into `model_dir`. Returns the note for the export's line
    when the run tunes one."""
    import yaml

    if meta.get("task") != "classification":
        return ""
    if meta.get("threshold_tuned") or meta.get("threshold", 0.5) != 0.5:  # with its cut(s): load_exported applies them
        (model_dir / "launcher.json").write_text(json.dumps(meta | {"threshold": 0.5, "threshold_tuned": False}))
    try:
        tunes = ((yaml.safe_load((ckpt / RUN_CONFIG).read_text()) or {}).get("eval") or {}).get("tune_threshold")
    except (OSError, yaml.YAMLError, AttributeError):
        tunes = False
    return "; decision rule: 0.5 (eval.tune_threshold tunes a cut only at the run's end, into its model/launcher.json)" \
        if tunes else ""


def _temporary_beside(out_dir: Path) -> Path:
    """A directory of our own beside OUT_DIR to export into (OUT_DIR.tmp may be the user's: it
    was removed unasked). One a killed export of OUT_DIR left (weights, maybe) goes first."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_dir.name}.export-"
    for left in out_dir.parent.glob(prefix + "*"):
        shutil.rmtree(left, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=prefix))


def latest_in(folder: Path) -> Path | None:
    """The latest complete checkpoint of a run directory or of its checkpoints/ folder, for a
    line that names the checkpoint to give where one of those was given."""
    found = complete_checkpoints(_root_of(folder))
    return found[-1][1] if found else None


def unsealed_in(folder: Path) -> list[Path]:
    """The checkpoint folders (step-N) of a run directory or of its checkpoints/ folder that
    have no marker: written in part (a run killed while sealing), not to export or resume."""
    return [p for _, p in _step_dirs(_root_of(folder)) if p.is_dir() and not (p / MARKER).is_file()]


def looks_like_checkpoint(folder: Path) -> bool:
    """A folder holding a checkpoint's skeleton/, or named step-N (asked of a folder that is no
    model: models.is_model_folder)."""
    return (folder / SKELETON).is_dir() or bool(_STEP_DIR.match(folder.name))


def _not_a_checkpoint(ckpt: Path) -> str:
    """The line for a folder without the marker; a run directory or its checkpoints/ folder
    (given where a checkpoint was meant) gets the checkpoint to give, and so does a checkpoint
    that is gone (its run's checkpoint.keep_last rotated it away)."""
    if not ckpt.exists():
        return f"{ckpt}: no such checkpoint{_latest_beside(ckpt)}"
    latest = latest_in(ckpt)
    hint = f"; its latest complete checkpoint is {latest}" if latest else ""
    return f"{ckpt}: not a complete checkpoint (no {MARKER} marker){hint}"


def removed_meanwhile(ckpt: Path, while_: str) -> str:
    """The line for a checkpoint whose marker went while it was read: its run rotated it away
    (checkpoint.keep_last removes the marker first), or someone removed it."""
    return (f"{ckpt}: removed while {while_} (its run keeps only checkpoint.keep_last checkpoints); give one that "
            f"stays, or copy it elsewhere first{_latest_beside(ckpt)}")


def _latest_beside(ckpt: Path) -> str:
    latest = latest_in(ckpt.parent) if ckpt.parent.is_dir() else None
    return f"; the latest complete one beside it is {latest}" if latest else ""


def export_checkpoint(ckpt: Path, out_dir: Path, trusted: bool = False, trust_remote_code: bool = False) -> str:
    """`launcher export`: any complete checkpoint -> a Hugging Face model directory, offline.

    No process group: DeepSpeed and FSDP shards are merged in this one process.
    Returns a description of what was read. Shards that are pickles (ZeRO's, FSDP's DCP
    metadata) are read only from a checkpoint this user's launcher wrote, or when `trusted`.
    A model whose config names Python files (auto_map) is built only with `trust_remote_code`.
    """
    if not (ckpt / MARKER).is_file():
        raise ConfigError(_not_a_checkpoint(ckpt))
    if (ckpt / "latest").is_file() or any(p.is_dir() for p in ckpt.glob("pytorch_model_fsdp_0*")):
        trust.require(ckpt, trusted, "launcher export", "pass --trust-checkpoint",
                      only=tuple(p.name for p in ckpt.iterdir() if p.is_dir() and p.name != SKELETON))
    if not (ckpt / SKELETON / "config.json").is_file():
        raise ConfigError(f"{ckpt}: no {SKELETON}/config.json (written by launcher since checkpoints carry one)")
    if out_dir.exists():
        raise ConfigError(f"{out_dir}: already exists; choose a new output directory")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from launcher import models

    skeleton = ckpt / SKELETON
    meta = models.export_meta(skeleton, given="CHECKPOINT")
    auto = AutoModelForCausalLM if meta.get("task") == "causal_lm" else AutoModelForSequenceClassification
    code = models.remote_code_gate(skeleton, trust_remote_code)
    try:
        return _export_sealed(ckpt, out_dir, skeleton, auto, code, meta, trusted)
    except Exception as e:
        if not (ckpt / MARKER).is_file():  # rotated away as it was read: not the reader's traceback
            raise ConfigError(removed_meanwhile(ckpt, "it was exported")) from e
        raise


def _export_sealed(ckpt: Path, out_dir: Path, skeleton: Path, auto, code: dict, meta: dict, trusted: bool = False) -> str:
    """export_checkpoint's work, once the checkpoint is found sealed."""
    from safetensors import SafetensorError
    from transformers import AutoConfig

    # Checked first: a skeleton file removed since (its tokenizer) made an export that does not
    # load, with exit 0; only the weights were found wanting, when their read failed.
    if not trusted and (lost := trust.damaged(ckpt)):
        raise ConfigError(f"{ckpt}: files were removed or changed size after it was sealed "
                          f"({trust.listed(lost, '; ')}); export another checkpoint, or pass --trust-checkpoint to "
                          "export it as it is")
    try:
        state_dict, source = engines.merged_weights(ckpt)
    except Exception as e:  # a file cut short since the seal: say so, not the reader's traceback
        lost = [] if isinstance(e, MemoryError) or not (ckpt / MARKER).is_file() else trust.damaged(ckpt)
        if lost:
            shown = trust.listed(lost, "; ")
            raise ConfigError(f"{ckpt}: its weights cannot be read: files were removed or changed size after it was "
                              f"sealed ({shown})") from e
        if isinstance(e, SafetensorError):  # overwritten in place at the same size, or damaged before its seal
            said = " ".join(str(e).split())[:200]
            raise ConfigError(f"{ckpt}: its weights cannot be read ({said}); export another checkpoint") from None
        raise
    dtype = meta.get("export_dtype")  # checkpoint.export_dtype, as the run resolved it
    if dtype:
        cast_floats(state_dict, dtype)
        source += f", exported in {dtype}"
    config = AutoConfig.from_pretrained(skeleton, **code)
    if meta.get("base_quantization"):  # the export (and the base rebuilt for it) is a plain model
        from launcher.quantization import plain_config

        config = plain_config(config)
    tmp = _temporary_beside(out_dir)
    try:
        shutil.copytree(skeleton, tmp, dirs_exist_ok=True)
        os.chmod(tmp, 0o777 & ~process_umask())  # OUT_DIR's mode: not mkdtemp's 0700, nor the copied skeleton's
        if (skeleton / "adapter_config.json").is_file():
            (tmp / "adapter_config.json").unlink()
            source += _export_lora(skeleton, tmp, auto, config, code, meta, state_dict, dtype)
        else:
            _export_whole(ckpt, tmp, auto, config, code, state_dict, dtype)
        source += _untuned_rule(tmp, ckpt, meta)
        _for_inference(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:  # nothing half-written is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return source
