"""Assemble the LightningModule from the ``model`` config: pretrained parts first, then inject."""

from __future__ import annotations

import warnings

import torch
from omegaconf import DictConfig, OmegaConf

from pbe_lightning.models.init_from import init_source, init_weights
from pbe_lightning.models.module import PaintByExampleModule
from pbe_lightning.utils.instantiators import instantiate

PARTS = ("backbone", "encoder", "noise_scheduler", "optimizer", "lr_scheduler")


def build_model(cfg: DictConfig) -> PaintByExampleModule:
    """``cfg`` is the ``model`` node. The encoder's output width follows the UNet it feeds.

    ``cfg.init_from`` (experiment=finetune) then replaces every weight, frozen ones included,
    with a trained Paint-by-Example model's (``models/init_from.py``); the configs still
    define the architecture.
    """
    init_from = init_source(cfg)
    with warnings.catch_warnings():
        if init_from:
            # The init weights replace this UNet, so its channel order is not a concern.
            warnings.filterwarnings("ignore", message="the UNet already has 9 input channels")
        backbone = instantiate(cfg.backbone)
    encoder = instantiate(cfg.encoder, context_dim=backbone.unet.config.cross_attention_dim)
    options = {k: v for k, v in cfg.items() if k not in (*PARTS, "init_from")}
    module = PaintByExampleModule(
        backbone=backbone,
        encoder=encoder,
        noise_scheduler=instantiate(cfg.noise_scheduler),
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        model_config=OmegaConf.to_container(cfg, resolve=True),
        **options,
    )
    if init_from:
        init_weights(module, init_from)
    return module


def load_trained(checkpoint_path: str, map_location: str = "cpu") -> PaintByExampleModule:
    """A trained module from a Lightning checkpoint alone (export, edit, evaluate).

    The checkpoint carries the resolved model config; frozen parts are rebuilt from the
    weight files it names, trainable ones come from the checkpoint.
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    config = checkpoint.get("pbe_model_config")
    if config is None:
        raise ValueError(
            f"{checkpoint_path} has no 'pbe_model_config': it was not written by pbe-lightning's "
            "train.py; for official Paint-by-Example weights use experiment=finetune model.init_from=..."
        )
    model = build_model(OmegaConf.create(config))
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
