"""One training step as Lightning runs it, on fake tensors, under the memory tracker.

The order matters for the peak, so it is Lightning's (2.x automatic optimisation): the
forward runs while the previous step's gradients still exist; ``zero_grad(set_to_none)``
comes after the forward and before the backward; then the module's non-finite check,
gradient clipping, the optimiser step and the EMA update. The step planned is a steady one:
gradients and optimiser state exist before it starts (a first optimiser step on zero
gradients creates them, as step 1 of a run does). Later micro-batches of an accumulation
window hold the same tensors (their gradients add into the existing ones in place), so one
forward and backward stand for all of them. Validation follows: the EMA weights swapped in
(a copy of the trainable weights kept aside), the validation loss, and one step of the
sample painting the callbacks do outside autocast (guided: twice the batch through the UNet).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.optim import Optimizer
from torch.utils.checkpoint import checkpoint

from pbe_lightning.models.module import PaintByExampleModule, nonfinite_gradients
from pbe_lightning.models.samplers import decode_latents, encode_latents
from pbe_lightning.plan.cuda_autocast import CudaAutocastPolicy
from pbe_lightning.plan.flops import StepFlopCounter
from pbe_lightning.plan.memory import (
    ACTIVATIONS,
    BUFFERS,
    CUDA_BLOCK,
    DDP_BUCKETS,
    EMA,
    GRADIENTS,
    OPTIMIZER,
    WEIGHTS_FROZEN,
    WEIGHTS_TRAINABLE,
    LiveMemory,
)

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
PRECISION_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
VALIDATION = "validation"  # the phase name of the validation part


@dataclass
class StepSpec:
    """What one device runs: its batch, precision, and what the trainer keeps beside it."""

    batch_size: int
    resolution: int
    reference_size: int
    precision: str = "32-true"
    device: str = "cuda"  # the device planned for (the plan itself always runs on the CPU)
    ema: bool = False
    validate_with_ema: bool = True
    ddp_buckets: bool = False  # DDP's gradient buckets: one more copy of the gradients
    gradient_clip_val: float | None = None
    validation: bool = True
    val_batch_size: int | None = None
    extra_frozen: tuple[torch.nn.Module, ...] = ()  # e.g. the metrics' CLIP, held on the device


def normalised_precision(precision: str | int) -> str:
    value = PRECISION_ALIASES.get(str(precision), str(precision))
    if value not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision}: the planner knows {', '.join(PRECISIONS)}"
        )
    return value


def simulate(
    module: PaintByExampleModule,
    optimizer: Optimizer,
    spec: StepSpec,
    fake_mode: FakeTensorMode | None,
    flops: StepFlopCounter | None = None,
) -> LiveMemory:
    """Run one steady training step (then validation) of ``module``; returns the tracker.

    On fake tensors, call inside ``fake_mode`` (the module's; a CUDA plan's autocast policy
    probes in it). On real tensors (``fake_mode`` None) the same step runs for real: what
    the tests compare. ``flops`` counts the step's forward and backward.
    """
    tracker = LiveMemory(block=CUDA_BLOCK if spec.device == "cuda" else 1)
    trainable = module.trainable_parameters()
    track_static(tracker, module, trainable, spec)
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: tracker.track([p.grad], GRADIENTS))
        for p in trainable
    ]
    mixed = spec.precision in AUTOCAST
    cuda_mixed = mixed and spec.device == "cuda" and fake_mode is not None
    policy = CudaAutocastPolicy(fake_mode) if cuda_mixed else None
    recomputing = [lambda: policy] if policy is not None else []
    recomputing += [lambda: flops.phase("recompute")] if flops is not None else []
    if recomputing and module.unet.is_gradient_checkpointing:
        recompute_under(module.unet, recomputing)
    try:
        with tracker, policy or nullcontext():
            shadow = ema_shadow(tracker, trainable) if spec.ema else None
            buckets = ddp_buckets(tracker, trainable) if spec.ddp_buckets else None
            prime_optimizer(tracker, optimizer, trainable)
            with tracker.labelled(ACTIVATIONS, "batch"):
                batch = fake_batch(spec.batch_size, spec.resolution, spec.reference_size)
                # Lightning's loader fetches one batch ahead: on the host, so on a CPU device.
                ahead = fake_batch(spec.batch_size, spec.resolution, spec.reference_size)
                ahead = ahead if spec.device == "cpu" else None
            train_step(tracker, module, optimizer, batch, spec, flops)
            if shadow is not None:
                with tracker.labelled(ACTIVATIONS, "EMA update"):
                    torch._foreach_lerp_(shadow, [p.detach() for p in trainable], 1e-4)
            del batch, ahead
            if spec.validation:
                validate(tracker, module, trainable, spec)
            del shadow, buckets
    finally:
        for hook in hooks:
            hook.remove()
    return tracker


def recompute_under(unet: torch.nn.Module, contexts: list[Callable[[], ContextManager]]) -> None:
    """The checkpointing diffusers does (non-reentrant), its recomputation run inside
    ``contexts`` (``context_fn``): there torch-function modes of the step (the CUDA autocast
    policy) are not active, and the FLOP counter tells recomputed ops apart."""

    @contextmanager
    def recomputation():
        with ExitStack() as stack:
            for make in contexts:
                stack.enter_context(make())
            yield

    def checkpointed(block: torch.nn.Module, *args):
        return checkpoint(
            block.__call__,
            *args,
            use_reentrant=False,
            context_fn=lambda: (nullcontext(), recomputation()),
        )

    unet.enable_gradient_checkpointing(checkpointed)


def track_static(
    tracker: LiveMemory, module: PaintByExampleModule, trainable: list, spec: StepSpec
) -> None:
    ids = {id(p) for p in trainable}
    tracker.track(trainable, WEIGHTS_TRAINABLE)
    tracker.track([p for p in module.parameters() if id(p) not in ids], WEIGHTS_FROZEN)
    tracker.track(module.buffers(), BUFFERS)
    for extra in spec.extra_frozen:
        tracker.track(extra.parameters(), WEIGHTS_FROZEN)


def ema_shadow(tracker: LiveMemory, trainable: list) -> list[torch.Tensor]:
    """The EMA callback's copy of the trainable weights (``callbacks/ema.py``)."""
    with tracker.labelled(EMA, "EMA"):
        return [p.detach().clone() for p in trainable]


def ddp_buckets(tracker: LiveMemory, trainable: list) -> list[torch.Tensor]:
    """DDP's reducer keeps the gradients in flat buckets beside ``.grad`` (unless
    ``gradient_as_bucket_view``): one more gradient-sized buffer per device."""
    with tracker.labelled(DDP_BUCKETS, "DDP buckets"):
        return [torch.empty_like(p) for p in trainable]


def prime_optimizer(tracker: LiveMemory, optimizer: Optimizer, trainable: list) -> None:
    """Step 1 of a run: gradients exist and the optimiser creates its state."""
    with tracker.labelled(GRADIENTS, "first step"):
        for param in trainable:
            param.grad = torch.zeros_like(param)
    with tracker.labelled(OPTIMIZER, "first step"):
        optimizer.step()
    gc.collect()  # some optimisers' steps leave reference cycles holding temporaries


def fake_batch(batch_size: int, resolution: int, reference_size: int) -> dict:
    """A batch in the data contract, as the DataModule puts it on the device."""
    image = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1
    mask = torch.ones(batch_size, 1, resolution, resolution)
    return {
        "image": image,
        "mask": mask,
        "masked_image": image * mask,
        "reference": torch.rand(batch_size, 3, reference_size, reference_size),
    }


def autocast(spec: StepSpec):
    """Lightning's mixed precision: autocast without its cache of cast weights (Lightning's
    ``MixedPrecision.autocast_context_manager``), so each cast lives only as long as its use."""
    if spec.precision in AUTOCAST:
        return torch.autocast("cpu", dtype=AUTOCAST[spec.precision], cache_enabled=False)
    return nullcontext()


def train_step(
    tracker: LiveMemory,
    module: PaintByExampleModule,
    optimizer: Optimizer,
    batch: dict,
    spec: StepSpec,
    flops: StepFlopCounter | None,
) -> None:
    """One optimiser step in Lightning's order (the first micro-batch of its window)."""
    scale = 2.0**16 if spec.precision == "16-mixed" else None  # GradScaler's initial scale
    counted = flops.phase if flops else lambda _name: nullcontext()
    with tracker.labelled(ACTIVATIONS, "forward"), counted("forward"), autocast(spec):
        loss = module.diffusion_loss(batch, module.draw_dropout(spec.batch_size))
    optimizer.zero_grad(set_to_none=True)
    with tracker.labelled(ACTIVATIONS, "backward"), counted("backward"):
        (loss * scale if scale else loss).backward()
    del loss
    trainable = module.trainable_parameters()
    with tracker.labelled(OPTIMIZER, "optimizer step"):
        nonfinite_gradients(trainable)  # the module's skip check (on_before_optimizer_step)
        grads = [p.grad for p in trainable if p.grad is not None]
        if scale:
            torch._foreach_mul_(grads, 1 / scale)  # GradScaler.unscale_
        if spec.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(trainable, spec.gradient_clip_val)
        del grads
        optimizer.step()


def validate(
    tracker: LiveMemory, module: PaintByExampleModule, trainable: list, spec: StepSpec
) -> None:
    """The validation loss, then one guided painting step at the validation batch size."""
    size = spec.val_batch_size or spec.batch_size
    with tracker.labelled(ACTIVATIONS, VALIDATION):
        backup = (
            [p.detach().clone() for p in trainable] if spec.ema and spec.validate_with_ema else []
        )
        batch = fake_batch(size, spec.resolution, spec.reference_size)
        with torch.no_grad():
            with autocast(spec):
                no_drop = torch.zeros(size, dtype=torch.bool)
                module.diffusion_loss(batch, no_drop)
            paint_step(module, batch)  # the callbacks paint outside autocast
        del backup, batch


def paint_step(module: PaintByExampleModule, batch: dict) -> torch.Tensor:
    """One step of ``models/samplers.paint``: exemplar contexts, masked latents, the guided
    UNet on both halves, the decode. The sampler loop repeats the UNet part."""
    context, uncond = module.contexts(batch["reference"])
    masked = encode_latents(module.vae, batch["masked_image"]).to(module.unet.dtype)
    latents = torch.randn_like(masked)
    mask = torch.nn.functional.interpolate(batch["mask"], size=masked.shape[-2:])
    unet_input = torch.cat([torch.cat([latents] * 2), torch.cat([masked] * 2)], dim=1)
    unet_input = torch.cat([unet_input, torch.cat([mask] * 2)], dim=1)
    t = torch.full((unet_input.shape[0],), 999, dtype=torch.long)
    eps = module.unet(unet_input, t, encoder_hidden_states=torch.cat([uncond, context])).sample
    return decode_latents(module.vae, latents - eps.chunk(2)[1])
