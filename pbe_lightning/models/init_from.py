"""``model.init_from`` (experiment=finetune): start training from trained Paint-by-Example weights.

Two sources, both read into the module's own state-dict names by ``pbe_lightning.convert``:

- the official release's single file (``model.ckpt`` of Fantasy-Studio/Paint-by-Example, the
  same tensors as ``.safetensors``, or ``python -m pbe_lightning.export --format official``),
  in its LDM layout (``convert.official``);
- a diffusers ``PaintByExamplePipeline`` folder (``python -m pbe_lightning.export`` writes one;
  ``convert.pipeline``).

The architecture still comes from ``model.backbone`` and ``model.encoder``: for the official
weights that is SD 1.x (the packaged default ``model.backbone.config``) and
``model.encoder.arch=ViT-L-14-quickgelu`` with ``mapper_depth=5``. Every tensor of the built
module is then replaced, the frozen VAE and CLIP tower included.

Nothing in the file runs: single files are read weights-only (``safe_load``); one holding
other objects is refused in one line, unless ``trust_checkpoint=true`` (the user trusts it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pbe_lightning.convert.keys import Tensors
from pbe_lightning.convert.official import from_official_layout, missing_parts
from pbe_lightning.convert.pipeline import PIPELINE_PARTS, from_pipeline, load_pipeline
from pbe_lightning.models.backbone import SINGLE_FILE_SUFFIXES, read_state_dict
from pbe_lightning.models.module import PaintByExampleModule
from pbe_lightning.safe_load import TRUST_FIX, check_loadable
from pbe_lightning.stops import RunStopped
from pbe_lightning.utils.file_checks import INIT_FROM_FIX as FIX

TRUSTED_INIT_FIX = f"(model.init_from) {TRUST_FIX}"


class InitWeightsMismatch(RunStopped, ValueError):
    """``model.init_from`` does not fit the configured architecture (every key named)."""


def init_source(cfg: DictConfig) -> str | None:
    """``model.init_from``, checked before anything loads; experiment=finetune requires it.

    Checked here because experiment=finetune also builds the backbone from it, whose own
    error would point at model.backbone.path instead; a file that would run code is refused
    here too, naming model.init_from and trust_checkpoint.
    """
    if OmegaConf.is_missing(cfg, "init_from"):
        raise ValueError(f"experiment=finetune needs the weights to start from: {FIX}")
    path = cfg.get("init_from")
    if path:
        check_clip_family(cfg.encoder.get("family", "clip"), path)
    if path and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"no weights at {path} (model.init_from): {FIX}")
    if path and Path(path).expanduser().is_file():
        check_loadable(Path(path).expanduser(), fix=TRUSTED_INIT_FIX)
    return path


def check_clip_family(family: str, path: str | Path) -> None:
    """Paint-by-Example weights hold a CLIP ViT: another tower family cannot take them."""
    if family != "clip":
        raise InitWeightsMismatch(
            f"model.init_from={path} holds a Paint-by-Example model, whose exemplar encoder is "
            f"a CLIP ViT: a {family} encoder (model.encoder.family={family}) cannot start from it."
            " Fine-tune with model/encoder=clip_vit_l14, or train the "
            f"{family} encoder from Stable Diffusion (experiment=paper, no model.init_from)"
        )


def init_weights(module: PaintByExampleModule, path: str | Path) -> None:
    """Overwrite every weight of ``module`` with those at ``path``, checked key by key first."""
    check_clip_family(module.encoder.family, path)
    state = load_init_weights(path, module)
    check_fits(module, state, path)
    module.load_state_dict(state)


def load_init_weights(path: str | Path, module: PaintByExampleModule) -> Tensors:
    """The weights at ``path`` under ``module``'s state-dict names.

    ``module`` supplies the architecture the conversions need: the UNet / VAE configs for the
    LDM layout and the open_clip tower whose names the transformers CLIP weights map back to.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"no weights at {source} (model.init_from): {FIX}")
    if source.is_dir():
        return _from_pipeline_folder(source, module)
    if source.suffix in SINGLE_FILE_SUFFIXES:
        return _from_official_file(source, module)
    raise ValueError(
        f"{source} (model.init_from) is neither a folder nor a {SINGLE_FILE_SUFFIXES} file: {FIX}"
    )


def check_fits(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Strict key and shape check, with every problem named (load_state_dict stops at the first)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or reshaped:
        raise InitWeightsMismatch(
            f"the weights at {source} (model.init_from) do not fit the model built from "
            f"model.backbone and model.encoder: {len(missing)} missing {missing[:10]}, "
            f"{len(unexpected)} unexpected {unexpected[:10]}, {len(reshaped)} of another shape "
            f"{reshaped[:10]}. The architecture comes from those configs: set model.backbone"
            ".config (single files) and model.encoder.arch / mapper_depth to match the weights"
        )


def _from_official_file(file: Path, module: PaintByExampleModule) -> Tensors:
    state = read_state_dict(file, fix=TRUSTED_INIT_FIX)
    absent = missing_parts(state)
    if absent:
        raise ValueError(
            f"{file} (model.init_from) has no {absent} keys, so it is not an "
            f"official Paint-by-Example checkpoint (Stable Diffusion weights go to "
            f"model.backbone.path instead): {FIX}"
        )
    return from_official_layout(
        state,
        unet_config=module.unet.config,
        vae_config=module.vae.config,
        vision=module.encoder.vision,
        source=f"{file} (model.init_from)",
    )


def _from_pipeline_folder(folder: Path, module: PaintByExampleModule) -> Tensors:
    absent = [p for p in PIPELINE_PARTS if not (folder / p).exists()]
    if absent:
        raise FileNotFoundError(
            f"{folder} (model.init_from) lacks {absent}, so it is not a PaintByExamplePipeline "
            f"folder (Stable Diffusion folders go to model.backbone.path instead): {FIX}"
        )
    # Stock loaders: they read every format diffusers wrote over the years (bin, safetensors,
    # older attention names) into today's names, which are our module's.
    return from_pipeline(
        load_pipeline(folder), module.encoder.vision, source=f"{folder} (model.init_from)"
    )
