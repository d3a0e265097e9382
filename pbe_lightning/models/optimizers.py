"""Optimisers the recipes can name beside torch's (``model.optimizer._target_``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from torch.optim import Optimizer

ADAMW_8BIT = "pbe_lightning.models.optimizers.adamw_8bit"
# The library each optimiser here needs (imported when the optimiser is built, not before).
LIBRARIES = {ADAMW_8BIT: "bitsandbytes"}


def missing_library(target: str) -> str | None:
    """The library ``model.optimizer._target_`` needs and this environment lacks, or None."""
    library = LIBRARIES.get(target)
    return library if library and importlib.util.find_spec(library) is None else None


def adamw_8bit(
    params: Iterable,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    fused: bool | None = None,
    min_8bit_size: int = 4096,
) -> Optimizer:
    """bitsandbytes' 8-bit AdamW: both moments quantised blockwise to 8 bits (2 bytes of
    state per parameter instead of torch AdamW's 8), the update computed in fp32.

    Why not ``_target_: bitsandbytes.optim.AdamW8bit`` in the config directly: a preset merges
    into the recipe's optimiser node, which keeps torch's ``fused: true``, a keyword
    bitsandbytes does not take (its update is one fused kernel already; ``fused`` is ignored
    here). Tensors under ``min_8bit_size`` elements (biases, norms) keep fp32 moments, as in
    bitsandbytes.
    """
    del fused
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError:
        raise ImportError(
            "model.optimizer adamw_8bit (memory=24gb) needs bitsandbytes: "
            "pip install bitsandbytes, or model.optimizer._target_=torch.optim.AdamW"
        ) from None
    return AdamW8bit(
        params,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        min_8bit_size=min_8bit_size,
    )
