"""Assemble the LightningModule from the ``model`` config: pretrained parts first, then inject."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pbe_lightning.models.module import PaintByExampleModule

PARTS = ("backbone", "encoder", "noise_scheduler", "optimizer", "lr_scheduler")


def build_model(cfg: DictConfig) -> PaintByExampleModule:
    """``cfg`` is the ``model`` node. The encoder's output width follows the UNet it feeds."""
    backbone = instantiate(cfg.backbone)
    encoder = instantiate(cfg.encoder, context_dim=backbone.unet.config.cross_attention_dim)
    options = {k: v for k, v in cfg.items() if k not in PARTS}
    return PaintByExampleModule(
        backbone=backbone,
        encoder=encoder,
        noise_scheduler=instantiate(cfg.noise_scheduler),
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        model_config=OmegaConf.to_container(cfg, resolve=True),
        **options,
    )
