"""The learning-rate schedules (`train.scheduler`): linear warmup, then linear decay, a half
cosine, or a constant.

The same functions as transformers' `get_scheduler` for these three names (tests compare them
step by step), written here because importing them is slow for us: `transformers.optimization`
imports `trainer_utils`, which imports peft, which imports bitsandbytes when it is installed, and
bitsandbytes compiles its kernels through torch's inductor: 5-6 s of imports on every rank of
every run, most of a short run's start. A `LambdaLR` of module-level partials, as transformers
builds, so a checkpoint's scheduler state loads either way.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _constant(step: int, *, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def lr_scheduler(name: str, optimizer, warmup: int, total: int) -> LambdaLR:
    """The schedule `name` (linear | cosine | constant) over `total` optimizer steps, the first
    `warmup` of them rising linearly from 0."""
    fn = {"linear": partial(_linear, warmup=warmup, total=total),
          "cosine": partial(_cosine, warmup=warmup, total=total),
          "constant": partial(_constant, warmup=warmup)}[name]
    return LambdaLR(optimizer, fn)
