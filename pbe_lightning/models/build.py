"""Assemble the LightningModule from the ``model`` config: pretrained parts first, then inject."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pbe_lightning.models import lr_schedules, optimizers
from pbe_lightning.models.init_from import init_source, init_weights
from pbe_lightning.models.module import PaintByExampleModule
from pbe_lightning.safe_load import UnsafeCheckpoint, is_trusted, load_checkpoint, trusted_files
from pbe_lightning.utils.instantiators import instantiate

PARTS = ("backbone", "encoder", "noise_scheduler", "optimizer", "lr_scheduler")

# What a checkpoint's stored model config may build: Hydra calls each ``_target_``, so a
# checkpoint that named ``os.system`` there would run it, tensors-only pickle or not.
BUILDERS = {
    "backbone": {
        "pbe_lightning.models.backbone.load_backbone",
        "pbe_lightning.demo.tiny_models.tiny_backbone",
    },
    "encoder": {
        "pbe_lightning.models.encoder.build_exemplar_encoder",
        "pbe_lightning.demo.tiny_models.tiny_exemplar_encoder",
        "pbe_lightning.demo.tiny_encoders.tiny_exemplar_encoder",
    },
}


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


def _targets(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every ``_target_`` under ``node``, keys dotted from ``where``."""
    if isinstance(node, dict):
        for key, child in node.items():
            full = f"{where}.{key}"
            if key == "_target_":
                yield full, child
            else:
                yield from _targets(child, full)
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _targets(child, f"{where}[{index}]")


def _subclass_in(module: Any, name: str, base: type) -> bool:
    found = getattr(module, name, None)
    return inspect.isclass(found) and issubclass(found, base)


def _is_builder(key: str, target: Any) -> bool:
    """Whether ``key=target`` is something train.py writes: our part builders, a torch
    optimiser, a diffusers noise scheduler or one of our learning-rate schedules."""
    part = key.split(".")[1] if key.count(".") == 2 else None  # model.<part>._target_ only
    if not isinstance(target, str) or part is None:
        return False
    if part in BUILDERS:
        return target in BUILDERS[part]
    module_name, _, name = target.rpartition(".")
    if name.startswith("_"):
        return False
    if part == "optimizer" and target in optimizers.LIBRARIES:  # ours, e.g. memory=24gb's
        return True
    if part == "optimizer" and module_name == "torch.optim":
        return _subclass_in(torch.optim, name, torch.optim.Optimizer)
    if part == "noise_scheduler" and module_name == "diffusers":
        import diffusers

        return _subclass_in(diffusers, name, diffusers.SchedulerMixin)
    if part == "lr_scheduler" and module_name == lr_schedules.__name__:
        schedule = getattr(lr_schedules, name, None)
        return inspect.isfunction(schedule) and schedule.__module__ == module_name
    return False


def check_stored_config(config: Any, source: str) -> None:
    """Refuse a checkpoint's model config that would build anything but a Paint-by-Example
    model (a ``_target_`` of ours, torch's optimisers, diffusers' schedulers) or that holds
    interpolations (``${...}`` is resolved when read: train.py stores resolved values)."""
    if not isinstance(config, dict):
        raise UnsafeCheckpoint(f"refused {source}: its pbe_model_config is not a mapping")
    odd = [(k, t) for k, t in _targets(config, "model") if not _is_builder(k, t)]
    if odd:
        key, target = odd[0]
        raise UnsafeCheckpoint(
            f"refused {source}: its model config has {key}={target!r}, which is not a "
            "pbe-lightning model part; building it would call it (a tampered checkpoint?). "
            "Use a checkpoint written by train.py"
        )
    if "${" in str(config):
        raise UnsafeCheckpoint(
            f"refused {source}: its model config holds ${{...}} interpolations, which train.py "
            "never writes (a tampered checkpoint?). Use a checkpoint written by train.py"
        )


def load_trained(checkpoint_path: str, map_location: str = "cpu") -> PaintByExampleModule:
    """A trained module from a Lightning checkpoint alone (export, edit, evaluate).

    The checkpoint carries the resolved model config; frozen parts are rebuilt from the
    weight files it names, trainable ones come from the checkpoint. Read weights-only
    (``safe_load``); its config may build only our model parts (:func:`check_stored_config`).
    A checkpoint the user trusts (``--trust-checkpoint``) lends that trust to the
    ``model.init_from`` file its config names, which rebuilds a fine-tuned model's frozen parts.
    """
    checkpoint = load_checkpoint(checkpoint_path, map_location=map_location)
    config = checkpoint.get("pbe_model_config") if isinstance(checkpoint, dict) else None
    if config is None:
        raise ValueError(
            f"{checkpoint_path} has no 'pbe_model_config': it was not written by pbe-lightning's "
            "train.py; for official Paint-by-Example weights use experiment=finetune "
            "model.init_from=..."
        )
    check_stored_config(config, str(checkpoint_path))
    init_from = config.get("init_from") if is_trusted(checkpoint_path) else None
    with trusted_files(init_from if isinstance(init_from, str) else None):
        model = build_model(OmegaConf.create(config))
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
