"""Config mistakes caught up front, ALL of them, one line each naming the key and the fix.

Torch and Lightning reject most of these values too, but late (after the weights load, in a
loader worker, at the first validation), one at a time and in their own words (``batch_size
should be a positive integer value``, a CUDA error, a loop that ends at once); on a cluster each
mistake would cost another launch and queue wait. ``train(cfg)`` calls :func:`check_config`
before anything is built; a sweep can call it for every job's config before queueing any: it
only reads the config and checks that files exist (``file_checks``), in milliseconds.

Each ``check_*`` looks at one concern and returns its problems; a key a recipe leaves out is not
checked (its component's default applies), a ``???`` key is reported once as not set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pbe_lightning.callbacks.edit_metrics import check_clip
from pbe_lightning.models.optimizers import missing_library
from pbe_lightning.stops import RunStopped
from pbe_lightning.utils.config_lookup import ABSENT, is_int, is_number, value
from pbe_lightning.utils.file_checks import FILE_CHECKS

__all__ = ["ConfigError", "check_config", "config_problems", "is_int", "is_number", "value"]


class ConfigError(RunStopped, ValueError):
    """Config values that cannot work. The message: one line per problem, each
    ``key=value``, why, and the fix."""


def found(*problems: str | None) -> list[str]:
    return [p for p in problems if p]


def problem(
    cfg: DictConfig, key: str, ok: Callable[[Any], bool], must: str, fix: str
) -> str | None:
    """``"key=value must ...: fix"`` unless ``ok(value)``; None when fine or not set."""
    current = value(cfg, key)
    if current is ABSENT:
        return None
    try:
        good = ok(current)
    except TypeError:  # a string where a number belongs, ...
        good = False
    return None if good else f"{key}={current} must {must}: {fix}"


def whole_at_least(low: int) -> Callable[[Any], bool]:
    return lambda x: is_int(x) and x >= low


def check_optimizer(cfg: DictConfig) -> list[str]:
    return found(
        problem(
            cfg,
            "model.optimizer.lr",
            lambda x: is_number(x) and x > 0,
            "be a positive number",
            "e.g. model.optimizer.lr=1e-5 (the paper's)",
        ),
        problem(
            cfg,
            "model.optimizer.weight_decay",
            lambda x: is_number(x) and x >= 0,
            "be a number >= 0",
            "e.g. model.optimizer.weight_decay=0.01, or 0 for none",
        ),
        problem(
            cfg,
            "model.lr_scheduler.warmup_steps",
            whole_at_least(0),
            "be a whole number >= 0",
            "e.g. model.lr_scheduler.warmup_steps=10000, or 0 for no warm-up",
        ),
    )


def check_optimizer_library(cfg: DictConfig) -> list[str]:
    """memory=24gb's 8-bit AdamW needs bitsandbytes: refused here, not after the weights load."""
    target = value(cfg, "model.optimizer._target_")
    library = missing_library(target) if isinstance(target, str) else None
    if library is None:
        return []
    return [
        f"model.optimizer._target_={target} (memory=24gb) needs {library}, which is not "
        f"installed: pip install {library}, or model.optimizer._target_=torch.optim.AdamW"
    ]


def check_guidance(cfg: DictConfig) -> list[str]:
    """Classifier-free guidance: its training dropout and the sampling of validation grids."""
    from pbe_lightning.models.samplers import SAMPLERS

    return found(
        problem(
            cfg,
            "model.cfg_dropout",
            lambda x: is_number(x) and 0 <= x <= 1,
            "be a probability in [0, 1]",
            "e.g. model.cfg_dropout=0.2 (the paper's)",
        ),
        problem(
            cfg,
            "model.cfg_dropout_mode",
            lambda x: x in ("per_sample", "per_batch"),
            "be per_sample or per_batch",
            "e.g. model.cfg_dropout_mode=per_sample",
        ),
        problem(
            cfg,
            "model.sampler",
            lambda x: x in SAMPLERS,
            f"be one of {', '.join(sorted(SAMPLERS))}",
            "e.g. model.sampler=ddim",
        ),
        problem(
            cfg,
            "model.sample_steps",
            whole_at_least(1),
            "be a whole number >= 1",
            "e.g. model.sample_steps=50",
        ),
        problem(
            cfg,
            "model.guidance_scale",
            lambda x: is_number(x) and x >= 0,
            "be a number >= 0",
            "e.g. model.guidance_scale=5.0 (1: no guidance)",
        ),
        problem(
            cfg,
            "model.max_nonfinite_steps",
            whole_at_least(1),
            "be a whole number >= 1",
            "e.g. model.max_nonfinite_steps=10",
        ),
    )


def check_batches(cfg: DictConfig) -> list[str]:
    """Sizes of what the data module hands the model."""
    sizes = (
        ("data.batch_size", "samples per GPU, e.g. data.batch_size=4"),
        ("data.resolution", "pixels, e.g. data.resolution=512"),
        ("data.reference_size", "pixels, e.g. data.reference_size=224"),
        ("data.batches_per_epoch", "batches per rank between validations, e.g. 1000"),
    )
    return found(
        *(problem(cfg, k, whole_at_least(1), "be a whole number >= 1", fix) for k, fix in sizes),
        problem(
            cfg,
            "data.val_batch_size",
            lambda x: x is None or whole_at_least(1)(x),
            "be a whole number >= 1 (or null: data.batch_size)",
            "e.g. data.val_batch_size=null",
        ),
        problem(
            cfg,
            "data.val_samples",
            whole_at_least(0),
            "be a whole number >= 0",
            "e.g. data.val_samples=16",
        ),
        problem(
            cfg,
            "data.max_upscale",
            lambda x: is_number(x) and x > 0,
            "be a positive number",
            "e.g. data.max_upscale=4.0",
        ),
    )


def check_loader(cfg: DictConfig) -> list[str]:
    """How the data is read: loader processes, shard sampling, source time-outs."""
    return found(
        problem(
            cfg,
            "data.num_workers",
            whole_at_least(0),
            "be a whole number >= 0 (0: load in the training process)",
            "e.g. data.num_workers=4",
        ),
        problem(
            cfg,
            "data.sampling",
            lambda x: x in ("resampled", "epochs"),
            "be resampled or epochs",
            "e.g. data.sampling=resampled",
        ),
        problem(
            cfg,
            "data.source_timeout_s",
            lambda x: is_number(x) and x > 0,
            "be a positive number of seconds",
            "e.g. data.source_timeout_s=120",
        ),
    )


def check_training_length(cfg: DictConfig) -> list[str]:
    """When training stops, logs, validates, steps and clips."""
    return found(
        problem(
            cfg,
            "trainer.max_steps",
            lambda x: is_int(x) and (x >= 1 or x == -1),
            "be a whole number >= 1 (or -1: no step limit)",
            "e.g. trainer.max_steps=400000",
        ),
        problem(
            cfg,
            "trainer.max_epochs",
            lambda x: x is None or (is_int(x) and (x >= 1 or x == -1)),
            "be a whole number >= 1 (or -1: no epoch limit)",
            "e.g. trainer.max_epochs=-1 (the stream is endless: trainer.max_steps ends training)",
        ),
        problem(
            cfg,
            "trainer.log_every_n_steps",
            whole_at_least(1),
            "be a whole number >= 1",
            "e.g. trainer.log_every_n_steps=50",
        ),
        problem(
            cfg,
            "trainer.accumulate_grad_batches",
            whole_at_least(1),
            "be a whole number >= 1",
            "e.g. trainer.accumulate_grad_batches=1 (no accumulation)",
        ),
        problem(
            cfg,
            "trainer.check_val_every_n_epoch",
            lambda x: x is None or whole_at_least(1)(x),
            "be a whole number >= 1 (or null)",
            "e.g. trainer.check_val_every_n_epoch=1 (an epoch is data.batches_per_epoch)",
        ),
        problem(
            cfg,
            "trainer.num_sanity_val_steps",
            whole_at_least(-1),
            "be a whole number >= 0 (or -1: all)",
            "e.g. trainer.num_sanity_val_steps=1",
        ),
        problem(
            cfg,
            "trainer.gradient_clip_val",
            lambda x: x is None or (is_number(x) and x >= 0),
            "be a number >= 0 (or null: no clipping)",
            "e.g. trainer.gradient_clip_val=1.0",
        ),
    )


def precisions() -> set:
    """Every ``Trainer(precision=...)`` value Lightning accepts."""
    from typing import get_args

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    def flatten(hint: Any) -> set:
        args = get_args(hint)
        return set().union(*map(flatten, args)) if args else {hint}

    return flatten(_PRECISION_INPUT)


def check_precision(cfg: DictConfig) -> list[str]:
    accepted = precisions()
    shown = ", ".join(sorted(str(p) for p in accepted if isinstance(p, str) and "-" in p))
    return found(
        problem(
            cfg,
            "trainer.precision",
            lambda x: x in accepted,
            f"be one of {shown}",
            "e.g. trainer.precision=bf16-mixed on a GPU, 32-true on a CPU",
        )
    )


def visible_gpus() -> int:
    """CUDA devices this process sees (NVML: no CUDA context), or 1 for an Apple GPU."""
    from lightning.fabric.accelerators.cuda import num_cuda_devices
    from lightning.fabric.accelerators.mps import MPSAccelerator

    return num_cuda_devices() or int(MPSAccelerator.is_available())


def check_accelerator(cfg: DictConfig) -> list[str]:
    """``trainer=gpu`` (ddp, fsdp) on a machine without a GPU, or more GPUs than it has."""
    accelerator = value(cfg, "trainer.accelerator")
    if accelerator not in ("gpu", "cuda"):
        return []
    gpus = visible_gpus()
    if gpus == 0:
        return [
            f"trainer.accelerator={accelerator} but this machine has no GPU that torch can see: "
            "use trainer=cpu (or trainer.accelerator=cpu), or check the driver and "
            "CUDA_VISIBLE_DEVICES"
        ]
    devices = value(cfg, "trainer.devices")
    if is_int(devices) and devices > gpus:  # per node
        return [
            f"trainer.devices={devices} but this machine has {gpus} GPU(s): use "
            f"trainer.devices={gpus} (or auto: all of them)"
        ]
    return []


def check_ema(cfg: DictConfig) -> list[str]:
    """``callbacks=ema``: a decay that averages, and a strategy that keeps whole weights."""
    if value(cfg, "callbacks.ema._target_") in (ABSENT, None):
        return []
    strategy = value(cfg, "trainer.strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy
    sharded = isinstance(target, str) and "fsdp" in target.lower()
    return found(
        problem(
            cfg,
            "callbacks.ema.decay",
            lambda x: is_number(x) and 0 < x < 1,
            "be in (0, 1)",
            "e.g. callbacks.ema.decay=0.9999",
        ),
        "callbacks=ema does not support trainer=fsdp yet (each rank holds only shards of the "
        "weights): use trainer=ddp with EMA, or drop callbacks=ema"
        if sharded
        else None,
    )


def check_edit_metrics(cfg: DictConfig) -> list[str]:
    """The paper's metrics while training need their CLIP's local weights (experiment=paper)."""
    every = value(cfg, "callbacks.edit_metrics.every_n_validations")
    if every in (ABSENT, None, 0) or value(cfg, "callbacks.edit_metrics._target_") is ABSENT:
        return []
    clip = value(cfg, "callbacks.edit_metrics.clip")
    clip = clip if isinstance(clip, DictConfig) else {}
    try:
        check_clip(clip.get("arch"), clip.get("checkpoint"))
    except (ValueError, FileNotFoundError) as error:
        return [str(error)]
    return []


def check_ablation_is_swept(cfg: DictConfig) -> list[str]:
    """``ablation=X`` is a grid for ``-m``: without it Hydra runs the recipe once, silently."""
    if not HydraConfig.initialized():
        return []
    hydra = HydraConfig.get()
    ablation = hydra.runtime.choices.get("ablation")
    if ablation and str(hydra.mode) != "RunMode.MULTIRUN":
        return [
            f"ablation={ablation} is a sweep grid, and this is a single run: put -m first "
            f"(python train.py -m ablation={ablation} ...), or drop ablation= for one run"
        ]
    return []


CHECKS: tuple[Callable[[DictConfig], list[str]], ...] = (
    *FILE_CHECKS,  # first: a path that is not there is the commonest mistake
    check_optimizer,
    check_optimizer_library,
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


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of ``cfg``, one line each (key=value, why, the fix); [] when it can run.

    Cheap: reads the config and checks that the files it names exist; builds and loads nothing.
    """
    return [line for check in CHECKS for line in check(cfg)]


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every value that cannot work, one line each, before
    anything is built or loaded."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
