"""The official Paint-by-Example release's single-file layout <-> our state-dict names.

Official layout, from ``ldm/models/diffusion/ddpm.py`` (``LatentDiffusion``) and
``ldm/modules/encoders/modules.py`` (``FrozenCLIPImageEmbedder``, GLIDE's ``xf.Transformer``) of
github.com/Fantasy-Studio/Paint-by-Example (its ``model.ckpt``, or the same tensors as
``.safetensors``); diffusers' ``convert_from_ckpt.convert_paint_by_example_checkpoint`` reads
the same names:

    model.diffusion_model.*                        UNet, 9 input channels
    first_stage_model.*                            VAE
    cond_stage_model.transformer.vision_model.*    transformers CLIPVisionModel (ViT-L/14)
    cond_stage_model.mapper.resblocks.{i}.*        attn.c_qkv, attn.c_proj, ln_1, mlp.c_fc,
                                                   mlp.c_proj, ln_2
    cond_stage_model.final_ln.*                    LayerNorm
    proj_out.*                                     Linear(1024, 768), on LatentDiffusion itself
    learnable_vector                               (1, 1, 768) unconditional context

Ours are the state-dict names of the training module: ``unet.*`` and ``vae.*`` (diffusers),
``encoder.vision.*`` (open_clip), ``encoder.mapper.blocks.{i}.*`` (diffusers
``BasicTransformerBlock``), ``encoder.final_layer_norm.*``, ``encoder.proj_out.*``,
``encoder.uncond_vector``. :func:`from_official_layout` reads the first into the second,
:func:`to_official_layout` writes the second into the first.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from pbe_lightning.convert.clip import (
    check_tower,
    vision_from_transformers,
    vision_to_transformers,
)
from pbe_lightning.convert.keys import Tensors, add_prefix, rename_prefixes, strip_prefix
from pbe_lightning.convert.ldm import (
    UNET_PREFIX,
    VAE_PREFIX,
    unet_from_ldm,
    unet_to_ldm,
    vae_from_ldm,
    vae_to_ldm,
)
from pbe_lightning.models.encoder import ExemplarEncoder

CLIP_PREFIX = "cond_stage_model.transformer."
MAPPER_PREFIX = "cond_stage_model.mapper.resblocks."
# Every official file has keys under each: a file without one is something else.
REQUIRED_PREFIXES = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, MAPPER_PREFIX)
# Official mapper block (GLIDE ResidualAttentionBlock) -> diffusers BasicTransformerBlock.
MAPPER_RENAMES = {
    "attn.c_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.c_proj": ("attn1.to_out.0",),
    "ln_1": ("norm1",),
    "ln_2": ("norm3",),
    "mlp.c_fc": ("ff.net.0.proj",),
    "mlp.c_proj": ("ff.net.2",),
}
# Official -> ours (under encoder.).
HEAD_RENAMES = {
    "cond_stage_model.final_ln.": "final_layer_norm.",
    "proj_out.": "proj_out.",
    "learnable_vector": "uncond_vector",
}


def missing_parts(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The official prefixes (``prefix*``) under which ``state`` has no key at all."""
    return [p + "*" for p in REQUIRED_PREFIXES if not any(k.startswith(p) for k in state)]


# -- official -> ours ----------------------------------------------------------------------------
def from_official_layout(
    state: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae_config: Mapping,
    vision: nn.Module,
    source: str,
) -> Tensors:
    """An official file's tensors under our module's state-dict names.

    The configs and the open_clip tower ``vision`` supply the architecture the conversions
    need; ``source`` names the file in errors. Keys are converted, not checked: compare the
    result with the module's state dict before loading it.
    """
    try:
        unet = unet_from_ldm(state, unet_config)
        vae = vae_from_ldm(state, vae_config)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"the UNet / VAE in {source} do not fit model.backbone's architecture "
            f"({error!r}): set model.backbone.config to match"
        ) from None
    clip = strip_prefix(state, CLIP_PREFIX)
    clip = strip_prefix(clip, "vision_model.") or clip  # transformers 5 saves CLIPVisionModel flat
    mapper = mapper_from_official(strip_prefix(state, MAPPER_PREFIX), source)
    return {
        **add_prefix("unet.", unet),
        **add_prefix("vae.", vae),
        **add_prefix("encoder.vision.", vision_from_transformers(clip, vision, source)),
        **add_prefix("encoder.mapper.blocks.", mapper),
        **add_prefix("encoder.", rename_prefixes(state, HEAD_RENAMES)),
    }


def mapper_from_official(state: Mapping[str, torch.Tensor], source: str = "the file") -> Tensors:
    """``{i}.attn.c_qkv.weight``... (GLIDE blocks) -> ``{i}.attn1.to_q.weight``... (diffusers)."""
    out = {}
    for key, tensor in state.items():
        index, _, rest = key.partition(".")
        name, _, kind = rest.rpartition(".")
        if name not in MAPPER_RENAMES:
            raise ValueError(f"unknown mapper weight {MAPPER_PREFIX}{key} in {source}")
        targets = MAPPER_RENAMES[name]
        # GLIDE splits c_qkv per head as [q | k | v]; with the mapper's single head that is
        # three equal row blocks, which is what diffusers' own converter assumes too.
        for target, part in zip(targets, tensor.chunk(len(targets))):
            out[f"{index}.{target}.{kind}"] = part
    return out


# -- ours -> official ----------------------------------------------------------------------------
def to_official_layout(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    encoder: ExemplarEncoder,
    replace: Mapping[str, torch.Tensor] | None = None,
) -> Tensors:
    """The parts' weights under the official release's names (the inverse of the reader).

    ``replace``: tensors to write instead of the parts' own, under our module's names
    (``unet.*``, ``encoder.*``...), e.g. EMA weights; the parts are not changed.
    Refuses, naming the cause and the fix, what the official layout cannot hold.
    """
    if encoder.bottleneck != "cls":
        raise ValueError(
            f"cannot write model.encoder.bottleneck={encoder.bottleneck!r} in the official "
            "layout: it conditions on CLIP's pooled class token only (bottleneck=cls). Keep "
            "the Lightning checkpoint for this model (edit and evaluate read it)"
        )
    check_tower(encoder.vision)
    replace = replace or {}
    unknown = sorted(k for k in replace if not k.startswith(("unet.", "vae.", "encoder.")))
    if unknown:
        raise ValueError(f"replacement weights for no part of the model: {unknown[:5]}")
    unet_state = {**unet.state_dict(), **strip_prefix(replace, "unet.")}
    vae_state = {**vae.state_dict(), **strip_prefix(replace, "vae.")}
    state = {**encoder.state_dict(), **strip_prefix(replace, "encoder.")}
    try:
        ldm = {**unet_to_ldm(unet_state, unet.config), **vae_to_ldm(vae_state, vae.config)}
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"cannot write this UNet / VAE in the official (LDM) layout: {error}. It holds "
            "Stable Diffusion 1.x-style backbones (one int layers_per_block, no extra "
            "embeddings): export --format diffusers instead"
        ) from None
    layers = len(encoder.vision.transformer.resblocks)
    clip = vision_to_transformers(strip_prefix(state, "vision."), layers)
    head = rename_prefixes(state, {ours: theirs for theirs, ours in HEAD_RENAMES.items()})
    return {
        **ldm,
        **add_prefix(CLIP_PREFIX + "vision_model.", clip),
        **add_prefix(MAPPER_PREFIX, mapper_to_official(strip_prefix(state, "mapper.blocks."))),
        **head,
    }


def mapper_to_official(state: Mapping[str, torch.Tensor]) -> Tensors:
    """Inverse of :func:`mapper_from_official`."""
    out = {}
    blocks = sorted({k.partition(".")[0] for k in state}, key=int)
    for index in blocks:
        for name, targets in MAPPER_RENAMES.items():
            for kind in ("weight", "bias"):
                parts = [state[f"{index}.{target}.{kind}"] for target in targets]
                out[f"{index}.{name}.{kind}"] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out
