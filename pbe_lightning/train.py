"""``train(cfg)``: a plain function from a composed config to a fitted model and its metrics."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import pbe_lightning.resolvers  # noqa: F401  (registers ${pbe.*} for the trainer configs)
from pbe_lightning.models.build import build_model, instantiate

log = logging.getLogger(__name__)
# The frozen VAE and CLIP tower are in eval mode on purpose; Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def instantiate_each(group: DictConfig | None) -> list:
    """A config group holding named components (callbacks, loggers) -> their instances."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


@rank_zero_only
def save_resolved_config(cfg: DictConfig, loggers: list[Logger]) -> None:
    """The fully resolved config beside the outputs and in every logger (W&B: run config)."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=last`` means this run folder's ``checkpoints/last.ckpt``, if there is one.

    A job restarted by a scheduler runs the same command; on its first start there is no
    checkpoint yet, and that must start fresh rather than fail.
    """
    path = cfg.get("ckpt_path")
    if path != "last":
        if path and not Path(path).is_file():
            raise FileNotFoundError(
                f"ckpt_path={path} does not exist: pass an existing checkpoint or ckpt_path=last"
            )
        return path
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    log.info("ckpt_path=last but %s does not exist yet: starting fresh", last)
    return None


@rank_zero_only
def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs: in a multirun all jobs share one process, and an open run would
    swallow the next job's metrics instead of starting its own run."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()


def train(cfg: DictConfig) -> dict[str, float]:
    """Build data, model, callbacks, loggers and trainer from ``cfg``; fit; return metrics."""
    L.seed_everything(cfg.seed, workers=True)
    # Data first: a wrong shard path fails in milliseconds, before any weights load.
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = build_model(cfg.model)
    loggers = instantiate_each(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_each(cfg.get("callbacks")), logger=loggers or False
    )
    save_resolved_config(cfg, loggers)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    finally:
        finish_loggers(loggers)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("finished in %s: %s", os.path.abspath(cfg.paths.output_dir), metrics)
    return metrics
