"""Checkpoints: save / rotate / find-latest / resume / export, and the run-directory policy.

A checkpoint is `checkpoints/step-NNNNNN/`: Accelerate's state (model, optimizer,
scheduler, RNG; per-rank shards under DeepSpeed) plus `trainer_state.json`
(step, epoch, tracker run ids, best metric). It is written into a hidden temp
directory and renamed into place only after every rank has finished and the
COMPLETE marker is written, so a crash never leaves a checkpoint that looks whole.
Every rank calls save/load/export: they are collectives.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import ConfigError

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Everything besides Accelerate's state that a resume needs; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    tracker_ids: dict = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    # The metric of the eval at this checkpoint's step, if one ran (for keep_best).
    metric_at_step: float | None = None
    first_eval: dict = field(default_factory=dict)

    @classmethod
    def read(cls, ckpt: Path) -> "TrainState":
        data = json.loads((ckpt / STATE_FILE).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint whose marker exists, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """Which checkpoint to start from, or None for a fresh run. Never overwrites a run.

    Every rank calls this before any rank creates anything, so all decide alike.
    """
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise ConfigError(f"checkpoint.resume: {resume}: not a complete checkpoint (no {MARKER} marker)")
        return path
    if not run_dir.exists():
        return None
    if resume == "never":
        raise ConfigError(
            f"run directory {run_dir} exists and checkpoint.resume=never; pick another --run-name or remove it"
        )
    latest = complete_checkpoints(run_dir / "checkpoints")
    if latest:
        return latest[-1][1]
    raise ConfigError(
        f"run directory {run_dir} exists but holds no complete checkpoint to resume; "
        "pick another --run-name or remove it"
    )


class Checkpointer:
    def __init__(self, cfg, run_dir: Path, rt, higher_is_better: bool):
        self.cfg = cfg
        self.root = run_dir / "checkpoints"
        self.rt = rt
        self.higher_is_better = higher_is_better

    def due(self, step: int) -> bool:
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def save(self, state: TrainState) -> Path:
        final = self.root / step_dir_name(state.step)
        if (final / MARKER).is_file():
            return final  # already saved at this step (e.g. periodic save == last step)
        tmp = self.root / f".tmp-{final.name}"
        self.rt.on_main(lambda: (self.root.mkdir(parents=True, exist_ok=True), shutil.rmtree(tmp, ignore_errors=True)))
        self.rt.accelerator.save_state(str(tmp))  # collective: every rank writes its part
        self.rt.barrier()
        self.rt.on_main(self._seal, tmp, final, state)
        return final

    def _seal(self, tmp: Path, final: Path, state: TrainState) -> None:
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
        (tmp / MARKER).write_text("")
        if final.exists():  # an incomplete leftover from a crash at this step
            shutil.rmtree(final)
        tmp.rename(final)
        self._rotate()

    def _rotate(self) -> None:
        ckpts = complete_checkpoints(self.root)
        keep = {step for step, _ in ckpts[-self.cfg.keep_last :]}
        if self.cfg.keep_best:
            scored = [(TrainState.read(p).metric_at_step, step) for step, p in ckpts]
            scored = [(m if self.higher_is_better else -m, -step) for m, step in scored if m is not None]
            if scored:  # best metric; among equals the earliest, as the best-step bookkeeping does
                keep.add(-max(scored)[1])
        for step, path in ckpts:
            if step not in keep:
                shutil.rmtree(path)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path) -> TrainState:
        self.rt.accelerator.load_state(str(path))
        return TrainState.read(path)


def export_model(rt, model, tokenizer, out_dir: Path, extra_files: dict[str, str]) -> None:
    """The final model in Hugging Face format (safetensors) with tokenizer and label names.

    `get_state_dict` gathers the full weights (a collective under ZeRO-3/FSDP), so
    every rank calls it; rank 0 writes into a temp dir and renames it into place.
    """
    state_dict = rt.accelerator.get_state_dict(model)

    def write():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = rt.accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)

    rt.on_main(write)
