"""Learning-rate schedules, built by Hydra as partials over the optimiser."""

from __future__ import annotations

from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up from 0 to the base LR over ``warmup_steps``, then constant (paper)."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return LambdaLR(optimizer, factor)


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then a cosine decay to 0 at ``total_steps``
    (diffusers' ``get_cosine_schedule_with_warmup``, named here so that checkpoints may
    rebuild it: ``models.build`` rebuilds only schedules of this module). A run shorter than
    twice its warm-up (a smoke test's few steps) warms up over its first half instead."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} (trainer.max_steps) must be positive")
    warmup = min(warmup_steps, total_steps // 2)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
