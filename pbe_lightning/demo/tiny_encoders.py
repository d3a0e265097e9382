"""Tiny random exemplar-encoder towers of every family, saved in each family's real format.

The encoder ablation (``ablation=encoder``) on the demo, and the tests, train these instead
of the real towers, through exactly the loaders real weights take (``models/towers.py``):

- ``clip``: an open_clip CLIP ViT with QuickGELU, like OpenAI's ViT-L/14;
- ``openclip``: an open_clip CLIP ViT with GELU and another width, like OpenCLIP's ViT-H/14;
- ``siglip``: an open_clip SigLIP model, its tower a timm ViT without a class token and with an
  attention-pool (MAP) head, like ViT-SO400M-14-SigLIP;

each as an open_clip ``local-dir:`` folder (``open_clip_config.json`` with the preprocessing,
``open_clip_model.safetensors``), the layout of open_clip's hub repositories; and

- ``dinov2``: a timm DINOv2 ViT (class token, layer scale), written by timm's own
  ``save_for_hf`` (``config.json`` with the model arguments, ``model.safetensors``), the layout
  of timm's hub repositories, loaded with ``timm.create_model("local-dir:...")``.

Towers are 32 px, patch 8 (a 4 x 4 patch grid), each with its own width, so the mapper's
width follows the tower as it does at full size. Generated once per cache folder,
deterministically. The tiny SigLIP's timm architecture is registered with timm when this
module is imported (timm has no SigLIP small enough): its name is in the folder's config, as
``vit_so400m_patch14_siglip_224`` is in the real one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import open_clip
import timm
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file
from timm.models import build_model_with_cfg, register_model, save_for_hf
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from pbe_lightning.demo.cache import generate_once
from pbe_lightning.models.encoder import Bottleneck, ExemplarEncoder, build_exemplar_encoder
from pbe_lightning.models.encoder_weights import local_folder

SIZE, PATCH = 32, 8
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
TINY_SIGLIP_TRUNK = "vit_pbe_tiny_patch8_siglip_32"


def _text_cfg(width: int) -> dict:
    """A one-layer text tower: open_clip builds one with every model; the encoder drops it."""
    return {"context_length": 16, "vocab_size": 1000, "width": width, "heads": 2, "layers": 1}


# 4 layers: diffusers' PaintByExampleImageEncoder derives mapper depth (4 + 1) // 5 = 1 from it,
# so a CLIP tower trained with mapper_depth=1 exports to the stock pipeline.
TINY_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {
        "image_size": SIZE,
        "layers": 4,
        "width": 64,
        "patch_size": PATCH,
        "head_width": 32,
    },
    "text_cfg": _text_cfg(32),
}
TINY_OPENCLIP = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": SIZE,
        "layers": 4,
        "width": 80,
        "patch_size": PATCH,
        "head_width": 40,
    },
    "text_cfg": _text_cfg(32),
}
TINY_SIGLIP = {  # as open_clip's ViT-SO400M-14-SigLIP.json, scaled down
    "embed_dim": 48,
    "custom_text": True,
    "vision_cfg": {
        "image_size": SIZE,
        "timm_model_name": TINY_SIGLIP_TRUNK,
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
    },
    "text_cfg": {
        **_text_cfg(48),
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
    },
}
TINY_DINOV2 = {  # model arguments of timm's vit_small_patch14_dinov2, scaled down
    "architecture": "vit_small_patch14_dinov2",
    "model_args": {
        "patch_size": PATCH,
        "embed_dim": 96,
        "depth": 2,
        "num_heads": 2,
        "img_size": SIZE,
    },
}

# timm reads a registered architecture's preprocessing from its module's ``default_cfgs``.
default_cfgs = {
    TINY_SIGLIP_TRUNK: {
        "input_size": (3, SIZE, SIZE),
        "mean": SIGLIP_MEAN,
        "std": SIGLIP_STD,
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
}


@register_model
def vit_pbe_tiny_patch8_siglip_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A SigLIP-style timm ViT (no class token, MAP head), 32 px, 2 blocks of width 48."""
    args = dict(patch_size=PATCH, embed_dim=48, depth=2, num_heads=2, img_size=SIZE)
    args.update(class_token=False, global_pool="map")
    return build_model_with_cfg(
        VisionTransformer,
        TINY_SIGLIP_TRUNK,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **{**args, **kwargs},
    )


# -- writers ---------------------------------------------------------------------------------
def write_open_clip_folder(folder: Path, model_cfg: dict, mean, std, seed: int = 0) -> None:
    """A random open_clip model of ``model_cfg`` as a ``local-dir:`` folder."""
    torch.manual_seed(seed)
    config = dict(model_cfg)
    kind = open_clip.CustomTextCLIP if config.pop("custom_text", False) else open_clip.CLIP
    model = kind(**config)
    preprocess = {"mean": list(mean), "std": list(std), "size": SIZE}
    payload = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (folder / "open_clip_config.json").write_text(json.dumps(payload, indent=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))


def write_timm_folder(folder: Path, spec: dict, seed: int = 0) -> None:
    """A random timm model as timm writes one for its hub (``save_for_hf``)."""
    torch.manual_seed(seed)
    model = timm.create_model(spec["architecture"], pretrained=False, **spec["model_args"])
    save_for_hf(model, str(folder), model_args=spec["model_args"], safe_serialization=True)


WRITERS: dict[str, Callable[[Path], None]] = {
    "clip": partial(
        write_open_clip_folder,
        model_cfg=TINY_CLIP,
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
    ),
    "openclip": partial(
        write_open_clip_folder,
        model_cfg=TINY_OPENCLIP,
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
    ),
    "siglip": partial(
        write_open_clip_folder, model_cfg=TINY_SIGLIP, mean=SIGLIP_MEAN, std=SIGLIP_STD
    ),
    "dinov2": partial(write_timm_folder, spec=TINY_DINOV2),
}
FAMILY = {"clip": "clip", "openclip": "clip", "siglip": "siglip", "dinov2": "dinov2"}


def tiny_tower_folder(cache_dir: str | Path, tiny: str) -> Path:
    """The tiny ``tiny`` tower's folder in the cache, written once."""
    return ensure_tiny_tower(Path(cache_dir) / "tiny" / "encoders" / tiny, tiny)


def ensure_tiny_tower(folder: Path, tiny: str) -> Path:
    if tiny not in WRITERS:
        raise ValueError(f"no tiny {tiny!r} tower: use one of {sorted(WRITERS)}")
    return generate_once(folder, WRITERS[tiny])


# -- the config target -----------------------------------------------------------------------
def tiny_exemplar_encoder(
    tiny: str,
    arch: str,
    context_dim: int,
    family: str = "clip",
    checkpoint: str | None = None,
    bottleneck: Bottleneck = "cls",
    mapper_depth: int = 1,
    pooled_tokens: int = 4,
    image_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> ExemplarEncoder:
    """The tiny ``tiny`` tower written (once) into ``arch``'s ``local-dir:`` folder, then built
    by ``build_exemplar_encoder`` with every other option as given: the demo's stand-in for
    ``model/encoder=<family>`` (``conf/model/encoder/per_recipe/demo_*.yaml``)."""
    folder = local_folder(arch)
    if folder is None:
        raise ValueError(
            f"model.encoder.arch={arch}: a tiny tower is written to a local-dir: folder"
        )
    ensure_tiny_tower(folder, tiny)
    return build_exemplar_encoder(
        arch,
        context_dim,
        checkpoint,
        bottleneck,
        mapper_depth,
        family=family,
        pooled_tokens=pooled_tokens,
        image_size=image_size,
        mean=mean,
        std=std,
    )
