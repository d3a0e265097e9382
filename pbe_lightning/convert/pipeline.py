"""diffusers ``PaintByExamplePipeline`` folders <-> our parts and state-dict names.

The folder (``model_index.json``, ``vae/``, ``unet/``, ``image_encoder/``, ``scheduler/``,
``feature_extractor/``) runs with diffusers + transformers alone. The open_clip vision tower is
rewritten into a transformers ``CLIPVisionModel`` (``convert.clip``); the mapper,
``final_layer_norm``, ``proj_out`` and ``uncond_vector`` already carry diffusers' names and are
copied as they are.

Scheduler: ``PNDMScheduler`` with ``skip_prk_steps=True`` on our training noise schedule,
what the official ``Fantasy-Studio/Paint-by-Example`` release ships, so ``pipe(...)`` behaves as
users of that release expect; it equals our ``sampler=pndm``. To reproduce our DDIM samples,
set ``pipe.scheduler = make_sampler("ddim", noise_scheduler)``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from diffusers.pipelines.deprecated.paint_by_example import (
    PaintByExampleImageEncoder,
    PaintByExamplePipeline,
)
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig

from pbe_lightning.convert.clip import (
    clip_vision_config,
    vision_from_transformers,
    vision_to_transformers,
)
from pbe_lightning.convert.keys import Tensors, add_prefix, strip_prefix
from pbe_lightning.models.encoder import ExemplarEncoder
from pbe_lightning.models.samplers import make_sampler

PIPELINE_SAMPLER = "pndm"
PIPELINE_PARTS = (
    "model_index.json",
    "unet",
    "vae",
    "image_encoder",
    "scheduler",
    "feature_extractor",
)
BICUBIC = 3  # PIL.Image.BICUBIC, as our encoder resizes
# Copied under the same names: ours were named after diffusers' PaintByExampleImageEncoder.
HEAD_PREFIXES = ("mapper.", "final_layer_norm.", "proj_out.", "uncond_vector")
LIGHTNING_ONLY = (
    "keep the Lightning checkpoint: python -m pbe_lightning.edit --ckpt and evaluate.py "
    "ckpt_path= paint with it"
)


def check_clip_family(encoder: ExemplarEncoder, target: str) -> None:
    """Paint-by-Example's published formats hold a CLIP ViT exemplar tower, nothing else."""
    if encoder.family != "clip":
        raise ValueError(
            f"cannot export model.encoder.family={encoder.family} as {target}: both export "
            "formats hold Paint-by-Example's CLIP ViT exemplar tower (a transformers "
            f"CLIPVisionModel), which cannot hold a {encoder.family} tower; {LIGHTNING_ONLY}"
        )


# -- ours -> pipeline ----------------------------------------------------------------------------
def build_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    encoder: ExemplarEncoder,
    noise_scheduler: SchedulerMixin,
    replace: Mapping[str, torch.Tensor] | None = None,
) -> PaintByExamplePipeline:
    """A stock pipeline computing what the parts do.

    ``replace``: tensors to use instead of the parts' own, under our module's names
    (``unet.*``, ``encoder.*``), e.g. EMA weights; the parts themselves are not changed.
    """
    replace = replace or {}
    return PaintByExamplePipeline(
        vae=_with_weights(vae, strip_prefix(replace, "vae.")),
        image_encoder=image_encoder_to_diffusers(encoder, strip_prefix(replace, "encoder.")),
        unet=_with_weights(unet, strip_prefix(replace, "unet.")),
        scheduler=make_sampler(PIPELINE_SAMPLER, noise_scheduler),
        safety_checker=None,
        feature_extractor=feature_extractor(encoder),
        requires_safety_checker=False,
    )


def _with_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """``model`` itself, or a copy carrying ``weights``: the given part is never changed."""
    if not weights:
        return model
    model = copy.deepcopy(model)
    model.load_state_dict(weights, strict=False)
    return model


def image_encoder_to_diffusers(
    encoder: ExemplarEncoder, replace: Mapping[str, torch.Tensor] | None = None
) -> PaintByExampleImageEncoder:
    """diffusers' encoder computing what ours does on the pooled class token.

    ``replace``: tensors under ``encoder``'s own state-dict names to use instead of its own.
    Only CLIP towers (``model.encoder.family=clip``) with ``bottleneck=cls`` fit it.
    """
    check_clip_family(encoder, "a diffusers PaintByExamplePipeline")
    if encoder.bottleneck != "cls":
        raise ValueError(
            f"cannot export bottleneck={encoder.bottleneck!r}: diffusers' PaintByExample"
            "ImageEncoder conditions on CLIP's pooled class token only (bottleneck=cls)"
        )
    config = clip_vision_config(encoder)
    depth = (config.num_hidden_layers + 1) // 5  # how diffusers sizes its mapper
    if depth != len(encoder.mapper.blocks):
        raise ValueError(
            f"diffusers builds (layers + 1) // 5 = {depth} mapper blocks for a "
            f"{config.num_hidden_layers}-layer CLIP, this model has {len(encoder.mapper.blocks)}: "
            f"the stock pipeline could not load it (train with model.encoder.mapper_depth={depth})"
        )
    state = {**encoder.state_dict(), **(replace or {})}
    exported = PaintByExampleImageEncoder(config).eval()
    vision = getattr(exported.model, "vision_model", exported.model)  # flat in transformers 5
    layers = config.num_hidden_layers
    vision.load_state_dict(vision_to_transformers(strip_prefix(state, "vision."), layers))
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    missing, unexpected = exported.load_state_dict(head, strict=False)
    left = [k for k in missing if not k.startswith("model.")]
    if left or unexpected:
        raise RuntimeError(
            f"mapper weights do not fit diffusers': missing {left}, extra {unexpected}"
        )
    return exported.to(encoder.proj_out.weight.dtype)


def feature_extractor(encoder: ExemplarEncoder) -> CLIPImageProcessor:
    """Preprocessing as ours: squash to a square (no crop), bicubic, then CLIP mean / std."""
    side = encoder.image_size
    return CLIPImageProcessor(
        do_resize=True,
        size={"height": side, "width": side},
        resample=BICUBIC,
        do_center_crop=False,
        crop_size={"height": side, "width": side},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=encoder.mean.flatten().tolist(),
        image_std=encoder.std.flatten().tolist(),
        do_convert_rgb=True,
    )


def save_pipeline(pipe: PaintByExamplePipeline, folder: str | Path) -> Path:
    """``pipe`` as a folder that stock classes load (:func:`load_pipeline`); returns it."""
    out = Path(folder)
    pipe.save_pretrained(out, safe_serialization=True)
    save_image_encoder(pipe.image_encoder, out / "image_encoder")
    return out


def save_image_encoder(encoder: PaintByExampleImageEncoder, folder: Path) -> None:
    """Save the encoder with its CLIP under ``model.vision_model.*``, the official release's names.

    transformers 5 saves a fresh ``CLIPVisionModel`` flat (``model.embeddings.*``), which
    transformers 4 cannot load; both load the official names (5 renames them on load).
    """
    legacy = "model.vision_model."
    state = {
        k if k.startswith(legacy) or not k.startswith("model.") else legacy + k[len("model.") :]: v
        for k, v in encoder.state_dict().items()
    }
    encoder.save_pretrained(folder, state_dict=state, safe_serialization=True)


# -- pipeline -> ours ----------------------------------------------------------------------------
def load_pipeline(directory: str | Path) -> PaintByExamplePipeline:
    """Load a pipeline folder with stock classes, one component at a time.

    ``PaintByExamplePipeline.from_pretrained`` fails in diffusers 0.42 on the folders it saves
    ("diffusers has no class PaintByExampleImageEncoder"); component loading is the workaround.
    """
    folder = Path(directory)
    index = json.loads((folder / "model_index.json").read_text())
    scheduler_cls = getattr(diffusers, index["scheduler"][1])
    local = {"local_files_only": True}
    # Its config class is CLIPConfig; given the vision config it builds, it needs no guessing.
    encoder_config = CLIPVisionConfig.from_pretrained(folder, subfolder="image_encoder", **local)
    return PaintByExamplePipeline(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **local),
        image_encoder=PaintByExampleImageEncoder.from_pretrained(
            folder, subfolder="image_encoder", config=encoder_config, **local
        ).eval(),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **local),
        scheduler=scheduler_cls.from_pretrained(folder, subfolder="scheduler", **local),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor.from_pretrained(
            folder, subfolder="feature_extractor", **local
        ),
        requires_safety_checker=False,
    )


def from_pipeline(pipe: PaintByExamplePipeline, vision: nn.Module, source: str) -> Tensors:
    """A loaded pipeline's weights under our module's state-dict names.

    ``vision`` is the open_clip tower whose names the transformers CLIP weights map back to;
    ``source`` names the folder in errors. Keys are converted, not checked.
    """
    encoder = pipe.image_encoder
    clip = getattr(encoder.model, "vision_model", encoder.model).state_dict()
    head = {k: v for k, v in encoder.state_dict().items() if k.startswith(HEAD_PREFIXES)}
    return {
        **add_prefix("unet.", pipe.unet.state_dict()),
        **add_prefix("vae.", pipe.vae.state_dict()),
        **add_prefix("encoder.vision.", vision_from_transformers(clip, vision, source)),
        **add_prefix("encoder.", head),
    }
