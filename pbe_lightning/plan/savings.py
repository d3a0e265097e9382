"""What each memory choice saves, added one at a time: the reasoning behind ``memory=24gb``.

Rows, each keeping the ones above: fp32 baseline (``32-true``, no gradient checkpointing,
torch AdamW, frozen parts fp32), ``+ bf16-mixed``, ``+ gradient checkpointing``, ``+ 8-bit
AdamW``, ``+ frozen VAE/CLIP in bf16``. The first three change activations, so each is a
planned step of its own; the last two change only what is held for the whole run (optimiser
state, frozen weights), so their rows subtract exactly those bytes. All are training-step
peaks (validation left out); the rest of the run (batch, EMA, strategy) is as configured.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, open_dict

from pbe_lightning.models.optimizers import ADAMW_8BIT
from pbe_lightning.plan import MemoryPlan, plan
from pbe_lightning.plan.build_meta import build_module, fake_mode
from pbe_lightning.plan.config import FROZEN_DTYPE_TARGET
from pbe_lightning.plan.memory import LiveMemory
from pbe_lightning.plan.report import gib, table
from pbe_lightning.plan.step import prime_optimizer
from pbe_lightning.utils.instantiators import instantiate

ADAMW = "torch.optim.AdamW"


@dataclass
class Row:
    label: str
    peak: int
    how: str


def variant(cfg: DictConfig, precision: str, checkpointing: bool) -> DictConfig:
    """``cfg`` with torch AdamW, fp32 frozen parts, and this precision and checkpointing."""
    changed = copy.deepcopy(cfg)
    with open_dict(changed):
        changed.trainer.precision = precision
        changed.model.gradient_checkpointing = checkpointing
        changed.model.optimizer = optimizer_node(cfg, ADAMW)
        for key in [k for k, v in changed.callbacks.items() if _is_frozen_dtype(v)]:
            del changed.callbacks[key]
    return changed


def _is_frozen_dtype(node) -> bool:
    return hasattr(node, "get") and node.get("_target_") == FROZEN_DTYPE_TARGET


def optimizer_node(cfg: DictConfig, target: str) -> dict:
    node = cfg.model.optimizer
    return {
        "_target_": target,
        "_partial_": True,
        "lr": node.get("lr", 1e-5),
        "weight_decay": node.get("weight_decay", 0.01),
        "fused": True,
    }


def optimizer_state_bytes(cfg: DictConfig, targets: list[str]) -> dict[str, int]:
    """Bytes of state each optimiser keeps for ``cfg``'s trainable parameters, after a step."""
    mode = fake_mode()
    module = build_module(cfg.model, mode).module
    trainable = module.trainable_parameters()
    sizes = {}
    for target in targets:
        optimizer = instantiate(optimizer_node(cfg, target))(trainable)
        with mode:
            prime_optimizer(LiveMemory(), optimizer, trainable)
        sizes[target] = state_bytes(optimizer)
        for param in trainable:
            param.grad = None
    return sizes


def state_bytes(optimizer) -> int:
    storages = {
        id(value.untyped_storage()): value.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    }
    return sum(storages.values())


def savings(cfg: DictConfig, device: str | None, configured: MemoryPlan) -> list[Row]:
    steps = [
        ("fp32 baseline (32-true, no checkpointing, AdamW, frozen fp32)", "32-true", False),
        ("+ bf16-mixed", "bf16-mixed", False),
        ("+ gradient checkpointing", "bf16-mixed", True),
    ]
    rows = []
    for label, precision, checkpointing in steps:
        changed = variant(cfg, precision, checkpointing)
        result = plan(changed, device, count_flops=False, validation=False)
        rows.append(Row(label, result.peak, "planned step"))
    states = optimizer_state_bytes(cfg, [ADAMW, ADAMW_8BIT])
    peak = rows[-1].peak - (states[ADAMW] - states[ADAMW_8BIT])
    rows.append(Row("+ 8-bit AdamW (bitsandbytes)", peak, "its optimiser state"))
    frozen_fp32 = sum(p.parameters * 4 for p in configured.parts if not p.trainable)
    peak -= frozen_fp32 // 2
    rows.append(Row("+ frozen VAE/CLIP in bf16", peak, "its frozen weights"))
    return rows


def render_savings(rows: list[Row]) -> list[str]:
    lines, previous = [], None
    for row in rows:
        saved = "" if previous is None else gib(previous - row.peak)
        lines.append([row.label, gib(row.peak), saved, row.how])
        previous = row.peak
    header = ["memory choices, one added per row", "training-step peak GiB", "saves GiB", "from"]
    return ["", *table(header, lines)]
