"""Tiny randomly initialised models of the real classes, saved in the real formats.

The demo and the tests load them through exactly the code paths real weights take
(a diffusers folder for VAE + UNet, an open_clip ``local-dir:`` folder for CLIP), so nothing
about loading is mocked. Generated once per cache folder, deterministically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

from pbe_lightning.demo.cache import generate_once
from pbe_lightning.models.backbone import Backbone, load_backbone
from pbe_lightning.models.encoder import Bottleneck, ExemplarEncoder, build_exemplar_encoder

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,  # like a Stable Diffusion checkpoint: widened to 9 on load
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(16, 16, 32, 32),  # 4 levels: 8x downscaling, as in SD
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
# 4 layers: diffusers' PaintByExampleImageEncoder derives mapper depth (4 + 1) // 5 = 1 from it.
TINY_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_sd(folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")


def write_tiny_clip(folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP)
    size = TINY_CLIP["vision_cfg"]["image_size"]
    config = {
        "model_cfg": TINY_CLIP,
        "preprocess_cfg": {"mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD, "size": size},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))


def tiny_sd_folder(cache_dir: str | os.PathLike) -> Path:
    return generate_once(Path(cache_dir) / "tiny" / "sd", write_tiny_sd)


def tiny_clip_folder(cache_dir: str | os.PathLike) -> Path:
    return generate_once(Path(cache_dir) / "tiny" / "clip", write_tiny_clip)


def tiny_backbone(cache_dir: str) -> Backbone:
    """``model/backbone=tiny``: generate (once) a tiny SD folder and load it like real weights."""
    return load_backbone(str(tiny_sd_folder(cache_dir)))


def tiny_exemplar_encoder(
    cache_dir: str, context_dim: int, bottleneck: Bottleneck = "cls", mapper_depth: int = 1
) -> ExemplarEncoder:
    """``model/encoder=tiny``: a tiny open_clip ViT in a ``local-dir:`` folder, loaded normally."""
    folder = tiny_clip_folder(cache_dir)
    return build_exemplar_encoder(
        f"local-dir:{folder}", context_dim, None, bottleneck, mapper_depth
    )
