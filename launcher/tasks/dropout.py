"""Dropout whose masks on CPU cost a third of torch's.

On CPU `torch.bernoulli_` draws from one serial Mersenne twister, about 4.5 ns an element here
(2.9 ms for a LoRA layer's 8 x 130 x 576 input), and LoRA drops each adapted layer's input
separately: a fifth of a SmolLM2 + LoRA training step went to it. numpy's SFC64 makes 64
random bits in about 1 ns. `CpuDropout` is `nn.Dropout` with its masks drawn that way; the
model's own modules are re-classed in place, so parameters, hooks and `isinstance` checks are
untouched, and on CUDA, in evaluation or in place it is `nn.Dropout` itself. Attention
dropout that a model hands to its attention kernel as a probability (SDPA's dropout_p) never
calls the module and stays torch's.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def keep_mask(shape, p: float) -> torch.Tensor:
    """Bool mask of `shape`: each element kept with probability 1 - p, independently.

    Each element compares 32 random bits with round(p * 2^32), so p is exact to 2^-32 (torch's
    CUDA dropout compares a 24-bit float). The generator is seeded from torch's, so
    torch.manual_seed fixes the masks, a checkpointed RNG state resumes them and activation
    checkpointing (which restores torch's RNG state) replays them."""
    n = math.prod(shape)
    drop = round(p * 2**32)
    if drop >= 2**32:  # p within 2^-33 of 1: the threshold would not fit in an int32
        return torch.zeros(shape, dtype=torch.bool)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    bits = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.int32)[:n]
    # Uniform over the 2^32 int32 values, of which 2^32 - round(p * 2^32) are kept.
    return torch.from_numpy(bits).view(shape) >= drop - 2**31


class CpuDropout(torch.nn.Dropout):
    """`nn.Dropout` with `keep_mask`'s masks when training on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or not 0 < self.p < 1 or x.device.type != "cpu":
            return super().forward(x)
        # `where`, not a product with the mask: no float copy of it, forward or backward, and
        # autograd keeps the bool mask (a byte an element) for backward.
        return torch.where(keep_mask(x.shape, self.p), x, 0.0).mul_(1 / (1 - self.p))


def fast_cpu_masks(model) -> None:
    """Every plain `nn.Dropout` in the model (LoRA's included) becomes a `CpuDropout`, in place."""
    for module in model.modules():
        if type(module) is torch.nn.Dropout:
            module.__class__ = CpuDropout
