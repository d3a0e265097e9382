"""Config mistakes caught up front, each in one line that names the key and the fix.

Torch and Lightning reject most of these values too, but late (after the weights load, in a
loader worker, at the first validation) and in their own words (``batch_size should be a
positive integer value``, a CUDA error, a loop that ends at once). ``train(cfg)`` calls
:func:`check_config` before anything is built. Each ``check_*`` looks at one concern; a key a
recipe leaves out is not checked (its component's default applies).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pbe_lightning.callbacks.edit_metrics import check_clip

_ABSENT = object()


class ConfigError(ValueError):
    """A config value that cannot work. The message is one line: ``key=value``, why, the fix."""


def value(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``; ``_ABSENT`` where the config has no such key."""
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def require(cfg: DictConfig, key: str, ok: Callable[[Any], bool], must: str, fix: str) -> None:
    """Raise ``ConfigError("key=value must ...: fix")`` unless ``ok(value)``."""
    found = value(cfg, key)
    if found is _ABSENT:
        return
    try:
        good = ok(found)
    except TypeError:  # a string where a number belongs, ...
        good = False
    if not good:
        raise ConfigError(f"{key}={found} must {must}: {fix}")


def whole_at_least(low: int) -> Callable[[Any], bool]:
    return lambda x: is_int(x) and x >= low


def check_optimizer(cfg: DictConfig) -> None:
    require(
        cfg,
        "model.optimizer.lr",
        lambda x: is_number(x) and x > 0,
        "be a positive number",
        "e.g. model.optimizer.lr=1e-5 (the paper's)",
    )
    require(
        cfg,
        "model.optimizer.weight_decay",
        lambda x: is_number(x) and x >= 0,
        "be a number >= 0",
        "e.g. model.optimizer.weight_decay=0.01, or 0 for none",
    )
    require(
        cfg,
        "model.lr_scheduler.warmup_steps",
        whole_at_least(0),
        "be a whole number >= 0",
        "e.g. model.lr_scheduler.warmup_steps=10000, or 0 for no warm-up",
    )


def check_guidance(cfg: DictConfig) -> None:
    """Classifier-free guidance: its training dropout and the sampling of validation grids."""
    from pbe_lightning.models.samplers import SAMPLERS

    require(
        cfg,
        "model.cfg_dropout",
        lambda x: is_number(x) and 0 <= x <= 1,
        "be a probability in [0, 1]",
        "e.g. model.cfg_dropout=0.2 (the paper's)",
    )
    require(
        cfg,
        "model.cfg_dropout_mode",
        lambda x: x in ("per_sample", "per_batch"),
        "be per_sample or per_batch",
        "e.g. model.cfg_dropout_mode=per_sample",
    )
    require(
        cfg,
        "model.sampler",
        lambda x: x in SAMPLERS,
        f"be one of {', '.join(sorted(SAMPLERS))}",
        "e.g. model.sampler=ddim",
    )
    require(
        cfg,
        "model.sample_steps",
        whole_at_least(1),
        "be a whole number >= 1",
        "e.g. model.sample_steps=50",
    )
    require(
        cfg,
        "model.guidance_scale",
        lambda x: is_number(x) and x >= 0,
        "be a number >= 0",
        "e.g. model.guidance_scale=5.0 (1: no guidance)",
    )
    require(
        cfg,
        "model.max_nonfinite_steps",
        whole_at_least(1),
        "be a whole number >= 1",
        "e.g. model.max_nonfinite_steps=10",
    )


def check_batches(cfg: DictConfig) -> None:
    """Sizes of what the data module hands the model."""
    for key, fix in (
        ("data.batch_size", "samples per GPU, e.g. data.batch_size=4"),
        ("data.resolution", "pixels, e.g. data.resolution=512"),
        ("data.reference_size", "pixels, e.g. data.reference_size=224"),
        ("data.batches_per_epoch", "batches per rank between validations, e.g. 1000"),
    ):
        require(cfg, key, whole_at_least(1), "be a whole number >= 1", fix)
    require(
        cfg,
        "data.val_batch_size",
        lambda x: x is None or whole_at_least(1)(x),
        "be a whole number >= 1 (or null: data.batch_size)",
        "e.g. data.val_batch_size=null",
    )
    require(
        cfg,
        "data.val_samples",
        whole_at_least(0),
        "be a whole number >= 0",
        "e.g. data.val_samples=16",
    )
    require(
        cfg,
        "data.max_upscale",
        lambda x: is_number(x) and x > 0,
        "be a positive number",
        "e.g. data.max_upscale=4.0",
    )


def check_loader(cfg: DictConfig) -> None:
    """How the data is read: loader processes, shard sampling, source time-outs."""
    require(
        cfg,
        "data.num_workers",
        whole_at_least(0),
        "be a whole number >= 0 (0: load in the training process)",
        "e.g. data.num_workers=4",
    )
    require(
        cfg,
        "data.sampling",
        lambda x: x in ("resampled", "epochs"),
        "be resampled or epochs",
        "e.g. data.sampling=resampled",
    )
    require(
        cfg,
        "data.source_timeout_s",
        lambda x: is_number(x) and x > 0,
        "be a positive number of seconds",
        "e.g. data.source_timeout_s=120",
    )


def check_training_length(cfg: DictConfig) -> None:
    """When training stops, logs, validates, steps and clips."""
    require(
        cfg,
        "trainer.max_steps",
        lambda x: is_int(x) and (x >= 1 or x == -1),
        "be a whole number >= 1 (or -1: no step limit)",
        "e.g. trainer.max_steps=400000",
    )
    require(
        cfg,
        "trainer.max_epochs",
        lambda x: x is None or (is_int(x) and (x >= 1 or x == -1)),
        "be a whole number >= 1 (or -1: no epoch limit)",
        "e.g. trainer.max_epochs=-1 (the stream is endless: trainer.max_steps ends training)",
    )
    require(
        cfg,
        "trainer.log_every_n_steps",
        whole_at_least(1),
        "be a whole number >= 1",
        "e.g. trainer.log_every_n_steps=50",
    )
    require(
        cfg,
        "trainer.accumulate_grad_batches",
        whole_at_least(1),
        "be a whole number >= 1",
        "e.g. trainer.accumulate_grad_batches=1 (no accumulation)",
    )
    require(
        cfg,
        "trainer.check_val_every_n_epoch",
        lambda x: x is None or whole_at_least(1)(x),
        "be a whole number >= 1 (or null)",
        "e.g. trainer.check_val_every_n_epoch=1 (an epoch is data.batches_per_epoch)",
    )
    require(
        cfg,
        "trainer.num_sanity_val_steps",
        whole_at_least(-1),
        "be a whole number >= 0 (or -1: all)",
        "e.g. trainer.num_sanity_val_steps=1",
    )
    require(
        cfg,
        "trainer.gradient_clip_val",
        lambda x: x is None or (is_number(x) and x >= 0),
        "be a number >= 0 (or null: no clipping)",
        "e.g. trainer.gradient_clip_val=1.0",
    )


def precisions() -> set:
    """Every ``Trainer(precision=...)`` value Lightning accepts."""
    from typing import get_args

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    def flatten(hint: Any) -> set:
        args = get_args(hint)
        return set().union(*map(flatten, args)) if args else {hint}

    return flatten(_PRECISION_INPUT)


def check_precision(cfg: DictConfig) -> None:
    accepted = precisions()
    shown = ", ".join(sorted(str(p) for p in accepted if isinstance(p, str) and "-" in p))
    require(
        cfg,
        "trainer.precision",
        lambda x: x in accepted,
        f"be one of {shown}",
        "e.g. trainer.precision=bf16-mixed on a GPU, 32-true on a CPU",
    )


def visible_gpus() -> int:
    """CUDA devices this process sees (NVML: no CUDA context), or 1 for an Apple GPU."""
    from lightning.fabric.accelerators.cuda import num_cuda_devices
    from lightning.fabric.accelerators.mps import MPSAccelerator

    return num_cuda_devices() or int(MPSAccelerator.is_available())


def check_accelerator(cfg: DictConfig) -> None:
    """``trainer=gpu`` (ddp, fsdp) on a machine without a GPU, or more GPUs than it has."""
    accelerator = value(cfg, "trainer.accelerator")
    if accelerator not in ("gpu", "cuda"):
        return
    gpus = visible_gpus()
    if gpus == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no GPU that torch can see: "
            "use trainer=cpu (or trainer.accelerator=cpu), or check the driver and "
            "CUDA_VISIBLE_DEVICES"
        )
    devices = value(cfg, "trainer.devices")
    if is_int(devices) and devices > gpus:  # per node
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {gpus} GPU(s): use "
            f"trainer.devices={gpus} (or auto: all of them)"
        )


def check_ema(cfg: DictConfig) -> None:
    """``callbacks=ema``: a decay that averages, and a strategy that keeps whole weights."""
    if value(cfg, "callbacks.ema._target_") in (_ABSENT, None):
        return
    require(
        cfg,
        "callbacks.ema.decay",
        lambda x: is_number(x) and 0 < x < 1,
        "be in (0, 1)",
        "e.g. callbacks.ema.decay=0.9999",
    )
    strategy = value(cfg, "trainer.strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy
    if isinstance(target, str) and "fsdp" in target.lower():
        raise ConfigError(
            "callbacks=ema does not support trainer=fsdp yet (each rank holds only shards of the "
            "weights): use trainer=ddp with EMA, or drop callbacks=ema"
        )


def check_edit_metrics(cfg: DictConfig) -> None:
    """The paper's metrics while training need their CLIP's local weights (experiment=paper)."""
    every = value(cfg, "callbacks.edit_metrics.every_n_validations")
    if every in (_ABSENT, None, 0) or value(cfg, "callbacks.edit_metrics._target_") is _ABSENT:
        return
    clip = value(cfg, "callbacks.edit_metrics.clip")
    clip = clip if isinstance(clip, DictConfig) else {}
    try:
        check_clip(clip.get("arch"), clip.get("checkpoint"))
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None


def check_ablation_is_swept(cfg: DictConfig) -> None:
    """``ablation=X`` is a grid for ``-m``: without it Hydra runs the recipe once, silently."""
    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    ablation = hydra.runtime.choices.get("ablation")
    if ablation and str(hydra.mode) != "RunMode.MULTIRUN":
        raise ConfigError(
            f"ablation={ablation} is a sweep grid, and this is a single run: put -m first "
            f"(python train.py -m ablation={ablation} ...), or drop ablation= for one run"
        )


CHECKS = (
    check_optimizer,
    check_guidance,
    check_batches,
    check_loader,
    check_training_length,
    check_precision,
    check_accelerator,
    check_ema,
    check_edit_metrics,
    check_ablation_is_swept,
)


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first value that cannot work, before anything loads."""
    for check in CHECKS:
        check(cfg)
