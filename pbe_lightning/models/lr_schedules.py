"""Learning-rate schedules, built by Hydra as partials over the optimiser."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up from 0 to the base LR over ``warmup_steps``, then constant (paper)."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return LambdaLR(optimizer, factor)
