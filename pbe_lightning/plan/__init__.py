"""Memory and speed plan of a training run, before it runs: ``python -m pbe_lightning.plan``.

The real-size modules are built on fake tensors from their architecture configs (no GPU and
no weight file needed), and one steady training step plus validation runs on them in
Lightning's order, under a tracker of live tensor bytes and torch's FLOP counter. What one
device holds at the peak (weights, gradients, optimiser state, EMA, activations) is what
``torch.cuda.max_memory_allocated`` reports for that run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from pbe_lightning.callbacks.frozen_dtype import cast_frozen
from pbe_lightning.plan.build_meta import (
    build_module,
    clip_visual,
    fake_mode,
    open_clip_config,
)
from pbe_lightning.plan.config import RunSettings, run_settings
from pbe_lightning.plan.flops import StepFlopCounter, StepFlops
from pbe_lightning.plan.step import VALIDATION, StepSpec, simulate


@dataclass
class Part:
    name: str
    parameters: int
    trainable: bool
    dtype: torch.dtype
    nbytes: int


@dataclass
class MemoryPlan:
    settings: RunSettings
    sources: list[str]
    parts: list[Part]
    peak: int  # bytes, the step and validation together
    peak_phase: str
    breakdown: dict[str, int]  # bytes per category at the peak
    phase_peaks: dict[str, int] = field(default_factory=dict)
    flops: StepFlops | None = None
    optimizer: str = ""

    @property
    def train_peak(self) -> int:
        """The peak of the training step alone (what the first steps of a run reach)."""
        return max(v for phase, v in self.phase_peaks.items() if phase != VALIDATION)


def plan(
    cfg: DictConfig,
    device: str | None = None,
    count_flops: bool = True,
    validation: bool = True,
) -> MemoryPlan:
    """The plan of ``cfg`` (a composed ``train.yaml``) for one device of the run."""
    return plan_run(cfg.model, run_settings(cfg, device), count_flops, validation)


def plan_run(
    model: DictConfig,
    settings: RunSettings,
    count_flops: bool = True,
    validation: bool = True,
) -> MemoryPlan:
    """The plan of the module ``model`` (the ``model`` config node) trained as ``settings``."""
    mode = fake_mode()
    fake = build_module(model, mode)
    module = fake.module
    with mode:
        cast_frozen(module, settings.frozen_dtype)
        extra = metrics_clip(settings.metrics_clip_arch)
    optimizer = module.configure_optimizers()["optimizer"]  # outside: bitsandbytes' tables
    spec = StepSpec(
        batch_size=settings.batch_size,
        resolution=settings.resolution,
        reference_size=settings.reference_size,
        precision=settings.precision,
        device=settings.device,
        ema=settings.ema,
        validate_with_ema=settings.validate_with_ema,
        ddp_buckets=settings.strategy == "ddp" and not settings.ddp_bucket_view,
        gradient_clip_val=settings.gradient_clip_val,
        validation=validation,
        val_batch_size=settings.val_batch_size,
        extra_frozen=extra,
    )
    counter = StepFlopCounter(settings.batch_size) if count_flops else None
    with mode:
        tracker = simulate(module, optimizer, spec, mode, counter)
    return MemoryPlan(
        settings=settings,
        sources=fake.sources,
        parts=module_parts(module),
        peak=tracker.peak,
        peak_phase=tracker.peak_phase,
        breakdown=tracker.peak_live,
        phase_peaks=tracker.phase_peaks,
        flops=counter.result if counter else None,
        optimizer=f"{type(optimizer).__module__}.{type(optimizer).__name__}",
    )


def metrics_clip(arch: str | None) -> tuple[torch.nn.Module, ...]:
    """The CLIP tower ``callbacks.edit_metrics`` keeps on the device from its first validation
    on (build it inside fake mode)."""
    if not arch:
        return ()
    return (clip_visual(open_clip_config(arch)),)


def module_parts(module) -> list[Part]:
    encoder = module.encoder
    groups = [
        ("VAE (frozen)", list(module.vae.parameters()), False),
        ("exemplar image encoder (frozen)", list(encoder.vision.parameters()), False),
        ("UNet, 9 input channels (trained)", list(module.unet.parameters()), True),
        ("mapper + projection + uncond vector (trained)", encoder.trainable_parameters(), True),
    ]
    return [
        Part(
            name,
            sum(p.numel() for p in params),
            trainable,
            params[0].dtype,
            sum(p.numel() * p.element_size() for p in params),
        )
        for name, params, trainable in groups
    ]
