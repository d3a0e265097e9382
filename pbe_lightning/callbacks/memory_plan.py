"""``callbacks.memory_plan``: on a GPU, the planned peak memory beside the measured one.

At the start of fit (CUDA only; global rank 0), the run is planned as
``python -m pbe_lightning.plan`` plans it: the module rebuilt on fake tensors from its
config, one steady step in Lightning's order, with this trainer's precision, strategy,
batch and callbacks. A short form is logged; after ``after_steps`` optimiser steps
``torch.cuda.max_memory_allocated`` (since training started) is logged beside the plan's
training-step peak, as ``memory/planned_peak_gib`` and ``memory/measured_peak_gib``. Reading
the allocator's counter is a host call: no device sync. Planning an SD-sized model takes
about a minute of CPU time before the first step; ``~callbacks.memory_plan`` skips it.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
GIB = 2**30


class MemoryPlan(L.Callback):
    def __init__(self, after_steps: int = 3) -> None:
        if after_steps < 1:
            raise ValueError(
                f"callbacks.memory_plan.after_steps={after_steps}: use 1 or more (steps to "
                "run before the measured peak is logged)"
            )
        self.after_steps = after_steps
        self.planned: int | None = None
        self._reported = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type != "cuda" or not trainer.is_global_zero:
            return
        config = getattr(pl_module, "model_config", None)
        if config is None:
            log.warning("memory plan skipped: the module carries no model config to rebuild")
            return
        from pbe_lightning.plan import plan_run

        result = plan_run(OmegaConf.create(config), settings_of(trainer, pl_module), False)
        self.planned = result.train_peak
        log.info(short_form(result, torch.cuda.get_device_properties(pl_module.device)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._reported or self.planned is None or trainer.global_step < self.after_steps:
            return
        self._reported = True
        measured = torch.cuda.max_memory_allocated(pl_module.device)
        log.info(
            "memory after %d steps: measured peak %.2f GiB, planned %.2f GiB (%+.0f %%)",
            trainer.global_step,
            measured / GIB,
            self.planned / GIB,
            (measured / self.planned - 1) * 100,
        )
        pl_module.log("memory/planned_peak_gib", self.planned / GIB, rank_zero_only=True)
        pl_module.log("memory/measured_peak_gib", measured / GIB, rank_zero_only=True)


def short_form(result, device: object) -> str:
    total = getattr(device, "total_memory", 0) / GIB
    held = ", ".join(
        f"{name} {value / GIB:.2f}" for name, value in result.breakdown.items() if value
    )
    verdict = "fits" if result.peak / GIB + 1.0 <= total else "does NOT fit"
    return (
        f"memory plan: peak {result.peak / GIB:.2f} GiB per device at the {result.peak_phase} "
        f"({held}); training step {result.train_peak / GIB:.2f} GiB; this GPU has "
        f"{total:.1f} GiB: {verdict} (1 GiB kept for CUDA itself)"
    )


def settings_of(trainer: L.Trainer, pl_module: L.LightningModule):
    """What this trainer keeps on each device, read from the live trainer and callbacks."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from pbe_lightning.callbacks.ema import EMA
    from pbe_lightning.callbacks.frozen_dtype import FrozenDtype
    from pbe_lightning.plan.config import RunSettings
    from pbe_lightning.plan.step import normalised_precision

    data = trainer.datamodule
    ema = _find(trainer, EMA)
    frozen = _find(trainer, FrozenDtype)
    strategy = trainer.strategy
    kind = "fsdp" if isinstance(strategy, FSDPStrategy) else "single"
    kind = "ddp" if isinstance(strategy, DDPStrategy) else kind
    ddp_kwargs = getattr(strategy, "_ddp_kwargs", {}) or {}
    return RunSettings(
        batch_size=data.batch_size,
        resolution=data.spec.resolution,
        reference_size=data.spec.reference_size,
        val_batch_size=getattr(data, "val_batch_size", data.batch_size),
        precision=normalised_precision(trainer.precision),
        device="cuda",
        devices=trainer.num_devices,
        num_nodes=trainer.num_nodes,
        accumulate=trainer.accumulate_grad_batches,
        strategy=kind,
        ddp_bucket_view=bool(ddp_kwargs.get("gradient_as_bucket_view")),
        gradient_clip_val=trainer.gradient_clip_val,
        ema=ema is not None,
        validate_with_ema=bool(ema and ema.validate_with_ema),
        frozen_dtype=frozen.dtype if frozen else "fp32",
        gradient_checkpointing=bool(getattr(pl_module.unet, "is_gradient_checkpointing", False)),
        metrics_clip_arch=_metrics_clip_arch(trainer),
    )


def _find(trainer: L.Trainer, kind: type):
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def _metrics_clip_arch(trainer: L.Trainer) -> str | None:
    from pbe_lightning.callbacks.edit_metrics import EditMetrics

    metrics = _find(trainer, EditMetrics)
    return metrics.clip_arch if metrics is not None and metrics.every else None
