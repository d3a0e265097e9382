"""Export a trained module as a stock diffusers ``PaintByExamplePipeline`` folder.

The folder (``model_index.json``, ``vae/``, ``unet/``, ``image_encoder/``, ``scheduler/``,
``feature_extractor/``) runs with diffusers + transformers alone. The open_clip vision tower is
rewritten into a transformers ``CLIPVisionModel``; the mapper, ``final_layer_norm``,
``proj_out`` and ``uncond_vector`` already carry diffusers' names and are copied as they are.

Scheduler: ``PNDMScheduler`` with ``skip_prk_steps=True`` on our training noise schedule,
what the official ``Fantasy-Studio/Paint-by-Example`` release ships, so ``pipe(...)`` behaves as
users of that release expect; it equals our ``sampler=pndm``. To reproduce our DDIM samples,
set ``pipe.scheduler = make_sampler("ddim", module.noise_scheduler)``.

    python -m pbe_lightning.export --ckpt run/checkpoints/last.ckpt --out exported [--ema]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Mapping
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.deprecated.paint_by_example import (
    PaintByExampleImageEncoder,
    PaintByExamplePipeline,
)
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig

from pbe_lightning.models.encoder import ExemplarEncoder
from pbe_lightning.models.module import PaintByExampleModule
from pbe_lightning.models.samplers import make_sampler

EXPORT_SAMPLER = "pndm"
EMA_KEY = "pbe_ema"
BICUBIC = 3  # PIL.Image.BICUBIC, as our encoder resizes
# Copied under the same names: ours were named after diffusers' PaintByExampleImageEncoder.
HEAD_PREFIXES = ("mapper.", "final_layer_norm.", "proj_out.", "uncond_vector")
BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


# -- weights ---------------------------------------------------------------------------------
def ema_weights(module: PaintByExampleModule, checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The checkpoint's EMA weights, checked against the module (module state-dict names).

    Every trainable parameter must have an EMA value: a half-EMA export would silently mix
    two models.
    """
    ema = checkpoint.get(EMA_KEY)
    if ema is None:
        raise ValueError(
            f"the checkpoint has no {EMA_KEY!r} entry, so there are no EMA weights to export: "
            "export without --ema, or train with EMA enabled"
        )
    state = module.state_dict()
    unknown = sorted(set(ema) - set(state))
    if unknown:
        raise ValueError(f"EMA weights for parameters this model does not have: {unknown[:5]}")
    trainable = {id(p) for p in module.trainable_parameters()}
    missing = sorted(
        name for name, p in module.named_parameters() if id(p) in trainable and name not in ema
    )
    if missing:
        raise ValueError(
            f"{len(missing)} trainable parameters lack EMA weights, e.g. {missing[:5]}"
        )
    for name, value in ema.items():
        if value.shape != state[name].shape:
            raise ValueError(
                f"EMA {name} has shape {tuple(value.shape)}, the model {tuple(state[name].shape)}"
            )
    return {name: value.to(state[name].dtype) for name, value in ema.items()}


def strip_prefix(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def with_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """``model`` itself, or a copy carrying ``weights``: the trained module is never changed."""
    if not weights:
        return model
    model = copy.deepcopy(model)
    model.load_state_dict(weights, strict=False)
    return model


# -- open_clip vision tower -> transformers CLIPVisionModel ------------------------------------
def check_tower(vision: nn.Module) -> None:
    """Refuse open_clip towers that a ``CLIPVisionModel`` does not compute."""
    if not isinstance(vision, VisionTransformer):
        raise ValueError(
            f"cannot export {type(vision).__name__}: not an open_clip VisionTransformer"
        )
    blocks = list(vision.transformer.resblocks)
    problems = [
        ("attention pooling", vision.attn_pool is not None),
        ("pooling other than the class token", vision.pool_type != "tok"),
        ("no ln_pre", isinstance(vision.ln_pre, nn.Identity)),
        ("a biased patch embedding", vision.conv1.bias is not None),
        ("custom blocks", not all(type(b) is ResidualAttentionBlock for b in blocks)),
        ("layer scale", any(not isinstance(b.ls_1, nn.Identity) for b in blocks)),
    ]
    found = [name for name, bad in problems if bad]
    if found:
        raise ValueError(f"cannot export this CLIP tower to transformers' CLIPVisionModel: {found}")


def hidden_act(vision: VisionTransformer) -> str:
    act = vision.transformer.resblocks[0].mlp.gelu
    if isinstance(act, QuickGELU):  # OpenAI's CLIP weights were trained with it
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ValueError(
        f"cannot export CLIP activation {act!r}: transformers needs gelu or quick_gelu"
    )


def clip_vision_config(encoder: ExemplarEncoder) -> CLIPVisionConfig:
    vision = encoder.vision
    check_tower(vision)
    block = vision.transformer.resblocks[0]
    return CLIPVisionConfig(
        hidden_size=vision.transformer.width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(vision.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        image_size=encoder.image_size,
        patch_size=vision.conv1.kernel_size[0],
        num_channels=vision.conv1.in_channels,
        hidden_act=hidden_act(vision),
        layer_norm_eps=vision.ln_pre.eps,
        # PaintByExampleImageEncoder sizes proj_out from it when reloading.
        projection_dim=encoder.proj_out.out_features,
    )


def convert_vision(state: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` state dict -> transformers ``CLIPVisionTransformer``."""
    out = {
        "embeddings.patch_embedding.weight": state["conv1.weight"],
        "embeddings.class_embedding": state["class_embedding"],
        "embeddings.position_embedding.weight": state["positional_embedding"],
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            # nn.MultiheadAttention packs q, k, v (in that order) into one projection.
            q, k, v = state[f"{src}attn.in_proj_{kind}"].chunk(3)
            for name, part in zip(("q", "k", "v"), (q, k, v)):
                out[f"{dst}self_attn.{name}_proj.{kind}"] = part.clone()
            for ours, theirs in BLOCK_RENAMES.items():
                out[f"{dst}{theirs}.{kind}"] = state[f"{src}{ours}.{kind}"]
    return out


def export_image_encoder(
    encoder: ExemplarEncoder, overrides: Mapping[str, torch.Tensor]
) -> PaintByExampleImageEncoder:
    """diffusers' encoder computing what ours does on the pooled class token."""
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
    state = {**encoder.state_dict(), **overrides}
    exported = PaintByExampleImageEncoder(config).eval()
    vision = getattr(exported.model, "vision_model", exported.model)  # flat in transformers 5
    vision.load_state_dict(convert_vision(strip_prefix(state, "vision."), config.num_hidden_layers))
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


# -- the pipeline ----------------------------------------------------------------------------
def export_pipeline(
    module: PaintByExampleModule,
    out_dir: str | Path,
    ema: bool = False,
    checkpoint: Mapping | None = None,
) -> Path:
    """Write ``module`` as a ``PaintByExamplePipeline`` folder; returns the folder.

    ``ema=True`` exports the EMA weights stored under ``checkpoint["pbe_ema"]`` (the dict the
    module was loaded from) instead of the module's own trainable weights.
    """
    if ema and checkpoint is None:
        raise ValueError("ema=True needs the training checkpoint (checkpoint=torch.load(...))")
    overrides = ema_weights(module, checkpoint) if ema else {}
    out = Path(out_dir)
    pipe = PaintByExamplePipeline(
        vae=module.vae,
        image_encoder=export_image_encoder(module.encoder, strip_prefix(overrides, "encoder.")),
        unet=with_weights(module.unet, strip_prefix(overrides, "unet.")),
        scheduler=make_sampler(EXPORT_SAMPLER, module.noise_scheduler),
        safety_checker=None,
        feature_extractor=feature_extractor(module.encoder),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    save_official_layout(pipe.image_encoder, out / "image_encoder")
    return out


def save_official_layout(encoder: PaintByExampleImageEncoder, folder: Path) -> None:
    """Rewrite the encoder weights under ``model.vision_model.*``, the official release's names.

    transformers 5 saves a fresh ``CLIPVisionModel`` flat (``model.embeddings.*``), which
    transformers 4 cannot load; both load the official names (5 renames them on load).
    """
    legacy = "model.vision_model."
    state = {
        k if k.startswith(legacy) or not k.startswith("model.") else legacy + k[len("model.") :]: v
        for k, v in encoder.state_dict().items()
    }
    encoder.save_pretrained(folder, state_dict=state, safe_serialization=True)


def load_pipeline(directory: str | Path) -> PaintByExamplePipeline:
    """Load an exported folder with stock classes, one component at a time.

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


# -- command line ----------------------------------------------------------------------------
def export_checkpoint(ckpt: str | Path, out_dir: str | Path, ema: bool = False) -> Path:
    """A Lightning checkpoint written by ``train.py`` -> a pipeline folder."""
    from pbe_lightning.models.build import load_trained

    module = load_trained(str(ckpt))
    # mmap: only the EMA tensors are read, not a second copy of the whole checkpoint.
    checkpoint = (
        torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True) if ema else None
    )
    return export_pipeline(module, out_dir, ema=ema, checkpoint=checkpoint)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pbe_lightning.export",
        description="Export a pbe-lightning checkpoint as a PaintByExamplePipeline folder.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train.py")
    parser.add_argument("--out", required=True, help="folder to write the pipeline into")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (pbe_ema)")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).is_file():
        parser.error(f"no checkpoint at {args.ckpt}")
    out = export_checkpoint(args.ckpt, args.out, args.ema)
    print(f"exported {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
