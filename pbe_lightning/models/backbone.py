"""VAE + UNet from a user's Stable Diffusion weights, the UNet widened to 9 input channels.

Accepted: a diffusers folder (``vae/`` + ``unet/``) or one original-layout file
(``.safetensors`` / ``.ckpt`` with ``model.diffusion_model.*`` and ``first_stage_model.*``
keys), converted with diffusers' own converters and the architecture in ``config``
(default: the packaged SD 1.x configs). Only local files are read, and none runs code: single
files through ``safe_load`` (weights only), folders through diffusers (safetensors, or
``torch.load(weights_only=True)`` for ``.bin``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from torch import nn

from pbe_lightning.safe_load import RESAVE_FIX, WEIGHT_FILE_SUFFIXES, read_tensors

PAINT_BY_EXAMPLE_CHANNELS = 9  # noisy latent 4 | masked-image latent 4 | mask 1
SD15_CONFIG = Path(__file__).parent / "configs" / "sd15"
SINGLE_FILE_SUFFIXES = WEIGHT_FILE_SUFFIXES


@dataclass
class Backbone:
    vae: AutoencoderKL
    unet: UNet2DConditionModel


def load_backbone(path: str | None, config: str | None = None) -> Backbone:
    """Load VAE + UNet from ``path`` and make the UNet take Paint-by-Example's 9 channels."""
    fix = (
        "pass model.backbone.path=<diffusers folder or SD .safetensors/.ckpt file>, "
        "or use model/backbone=tiny"
    )
    if path is None:
        raise FileNotFoundError(f"model.backbone.path is not set: {fix}")
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"no Stable Diffusion weights at {source}: {fix}")
    if source.is_dir():
        vae, unet = _from_diffusers_folder(source, fix)
    elif source.suffix in SINGLE_FILE_SUFFIXES:
        vae, unet = _from_single_file(source, Path(config) if config else SD15_CONFIG)
    else:
        raise ValueError(
            f"{source} is neither a diffusers folder nor a {SINGLE_FILE_SUFFIXES} file: {fix}"
        )
    vae.requires_grad_(False).eval()
    return Backbone(vae=vae, unet=widen_input(unet))


def _from_diffusers_folder(folder: Path, fix: str) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    for part in ("vae", "unet"):
        if not (folder / part / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no {part}/config.json, so it is not a diffusers folder: {fix}"
            )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    return vae, unet


def read_state_dict(file: Path, fix: str = RESAVE_FIX) -> dict[str, torch.Tensor]:
    """A weight file's tensors (its ``state_dict`` entry if it has one): ``.safetensors``, or a
    torch file read weights-only; one holding more is refused, naming ``fix``."""
    return read_tensors(file, fix=fix)


def _from_single_file(file: Path, config_dir: Path) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    state = read_state_dict(file)
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise ValueError(
            f"{file} has no 'model.diffusion_model.*' keys, so it is not an original-layout SD "
            "checkpoint: pass a diffusers folder as model.backbone.path instead"
        )
    unet_config = _read_config(config_dir / "unet" / "config.json")
    vae_config = _read_config(config_dir / "vae" / "config.json")
    ldm_in = state["model.diffusion_model.input_blocks.0.0.weight"].shape[1]
    unet_config["in_channels"] = ldm_in
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL.from_config(vae_config)
    _load_exactly(unet, convert_ldm_unet_checkpoint(state, unet_config), file, config_dir / "unet")
    _load_exactly(vae, convert_ldm_vae_checkpoint(state, vae_config), file, config_dir / "vae")
    return vae, unet


def _read_config(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(
            f"no architecture config at {file}: pass model.backbone.config=<folder with unet/ "
            "and vae/config.json> matching the checkpoint"
        )
    return json.loads(file.read_text())


def _load_exactly(model: nn.Module, state: dict, file: Path, config: Path) -> None:
    fix = (
        f"weights in {file} do not match the architecture in {config}: pass "
        "model.backbone.config=<folder with the matching unet/ and vae/config.json>"
    )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even when not strict
        raise ValueError(f"{fix} ({str(error)[:300]}...)") from None
    if missing or unexpected:
        raise ValueError(f"{fix} (missing {missing[:3]}, unexpected {unexpected[:3]})")


def widen_input(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """4 -> 9 input channels, the 5 new ones zero-initialised.

    Zero weights make the widened UNet compute exactly what the pretrained one did, whatever
    the extra channels hold, so fine-tuning starts from the pretrained model's behaviour.
    """
    channels = unet.config.in_channels
    if channels == PAINT_BY_EXAMPLE_CHANNELS:
        warnings.warn(
            "the UNet already has 9 input channels: used as is, assuming the order "
            "[noisy latent | masked-image latent | mask] (SD-inpainting UNets order them "
            "differently)",
            stacklevel=2,
        )
        return unet
    if channels != 4:
        raise ValueError(
            f"the UNet has {channels} input channels; expected 4 (SD) or 9 (Paint by Example)"
        )
    old = unet.conv_in
    new = nn.Conv2d(
        PAINT_BY_EXAMPLE_CHANNELS,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=PAINT_BY_EXAMPLE_CHANNELS)
    return unet


def vae_downscale(vae: AutoencoderKL) -> int:
    """Pixels per latent cell (8 for SD); read from the VAE so tiny test VAEs work too."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
