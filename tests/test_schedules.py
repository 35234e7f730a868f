"""The learning-rate schedules equal transformers' `get_scheduler` (which launcher no longer
imports: see launcher/schedules.py), step by step, and their state moves between the two."""

from __future__ import annotations

import pytest
import torch

from launcher.schedules import lr_scheduler

HF_NAME = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def _lrs(sched, opt, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _opt():
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-4)


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 17), (17, 17), (5, 1)])
def test_schedule_equals_transformers_step_by_step(name, warmup, total):
    from transformers import get_scheduler

    ours_opt, hf_opt = _opt(), _opt()
    ours = lr_scheduler(name, ours_opt, warmup, total)
    hf = get_scheduler(HF_NAME[name], hf_opt, num_warmup_steps=warmup, num_training_steps=total)
    assert _lrs(ours, ours_opt, total + 3) == pytest.approx(_lrs(hf, hf_opt, total + 3), rel=1e-12, abs=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_a_checkpointed_transformers_schedule_continues_here(name):
    """Checkpoints written before this module hold a transformers LambdaLR's state."""
    from transformers import get_scheduler

    hf_opt = _opt()
    hf = get_scheduler(name, hf_opt, num_warmup_steps=2, num_training_steps=12)
    _lrs(hf, hf_opt, 5)
    ours_opt = _opt()
    ours = lr_scheduler(name, ours_opt, 2, 12)
    ours_opt.load_state_dict(hf_opt.state_dict())
    ours.load_state_dict(hf.state_dict())
    assert _lrs(ours, ours_opt, 7) == pytest.approx(_lrs(hf, hf_opt, 7), rel=1e-12, abs=0)
