"""The composed training config, read for what one device will hold.

Composed exactly as ``train.py`` composes it: ``conf/train.yaml`` through Hydra's compose API
with the same command-line overrides, brace patterns quoted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import pbe_lightning.utils.resolvers  # noqa: F401  (${pbe.*} in the trainer configs)
from pbe_lightning.plan.step import normalised_precision
from pbe_lightning.utils.overrides import quote_brace_patterns

CHECKOUT_CONF = Path(__file__).resolve().parents[2] / "conf"
EMA_TARGET = "pbe_lightning.callbacks.ema.EMA"
FROZEN_DTYPE_TARGET = "pbe_lightning.callbacks.frozen_dtype.FrozenDtype"


def find_config_dir(config_dir: str | Path | None = None) -> Path:
    """``config_dir``, else ``./conf``, else the checkout's: the one holding ``train.yaml``."""
    candidates = [Path(config_dir)] if config_dir else [Path.cwd() / "conf", CHECKOUT_CONF]
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"no train.yaml in {', '.join(map(str, candidates))}: run from the repository root "
        "or pass --config-dir /path/to/pbe-lightning/conf"
    )


def compose_train_config(overrides: list[str], config_dir: str | Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(find_config_dir(config_dir)), version_base="1.3"):
        return compose("train", overrides=quote_brace_patterns(list(overrides)))


@dataclass
class RunSettings:
    """What the trainer and callbacks keep on each device, read from the config."""

    batch_size: int
    resolution: int
    reference_size: int
    val_batch_size: int
    precision: str
    device: str  # cuda or cpu: the device planned for
    devices: int | None  # per node; None: "auto" (every GPU of the node)
    num_nodes: int
    accumulate: int
    strategy: str  # ddp, fsdp or single
    ddp_bucket_view: bool
    gradient_clip_val: float | None
    ema: bool
    validate_with_ema: bool
    frozen_dtype: str
    gradient_checkpointing: bool
    metrics_clip_arch: str | None

    def global_batch(self, devices: int | None = None) -> int | None:
        count = devices or self.devices
        if count is None:
            return None
        return self.batch_size * count * self.num_nodes * self.accumulate


def run_settings(cfg: DictConfig, device: str | None = None) -> RunSettings:
    trainer, data, callbacks = cfg.trainer, cfg.data, cfg.get("callbacks") or {}
    ema = _callback(callbacks, EMA_TARGET)
    frozen = _callback(callbacks, FROZEN_DTYPE_TARGET)
    strategy = _strategy(trainer.get("strategy"))
    metrics = callbacks.get("edit_metrics") or {}
    return RunSettings(
        batch_size=int(data.batch_size),
        resolution=int(data.resolution),
        reference_size=int(data.reference_size),
        val_batch_size=int(data.get("val_batch_size") or data.batch_size),
        precision=normalised_precision(trainer.precision),
        device=device or ("cpu" if trainer.get("accelerator") == "cpu" else "cuda"),
        devices=trainer.devices if isinstance(trainer.devices, int) else None,
        num_nodes=int(trainer.get("num_nodes") or 1),
        accumulate=int(trainer.get("accumulate_grad_batches") or 1),
        strategy=strategy,
        ddp_bucket_view=_bucket_view(trainer.get("strategy")),
        gradient_clip_val=trainer.get("gradient_clip_val"),
        ema=ema is not None,
        validate_with_ema=bool(ema.get("validate_with_ema", True)) if ema else False,
        frozen_dtype=str(frozen.get("dtype", "bf16")) if frozen else "fp32",
        gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)),
        metrics_clip_arch=cfg.get("metrics_clip", {}).get("arch")
        if metrics.get("every_n_validations")
        else None,
    )


def _callback(callbacks: DictConfig | dict, target: str) -> DictConfig | None:
    for node in callbacks.values():
        if isinstance(node, (dict, DictConfig)) and node.get("_target_") == target:
            return node
    return None


def _strategy(node) -> str:
    text = str(node.get("_target_") if isinstance(node, (dict, DictConfig)) else node).lower()
    if "fsdp" in text:
        return "fsdp"
    return "ddp" if "ddp" in text else "single"


def _bucket_view(node) -> bool:
    return bool(isinstance(node, (dict, DictConfig)) and node.get("gradient_as_bucket_view"))
