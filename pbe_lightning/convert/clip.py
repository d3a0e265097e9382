"""open_clip ``VisionTransformer`` <-> transformers ``CLIPVisionModel``: config and weights.

Our encoder runs CLIP as an open_clip tower; the diffusers pipeline and the official release
hold it as a transformers ``CLIPVisionModel`` (``CLIPVisionTransformer`` weights). The names
differ, and open_clip packs q, k, v into one projection. :func:`vision_to_transformers` writes
the transformers names; :func:`vision_from_transformers` reads them back, by a plan derived from
the writer (:func:`_vision_plan`) rather than a second table that could drift from it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import nn
from transformers import CLIPVisionConfig

from pbe_lightning.convert.keys import Tensors
from pbe_lightning.models.encoder import ExemplarEncoder

BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Persistent in the transformers 4.x the official model was saved with; recomputed now.
IGNORED_TRANSFORMERS_KEYS = {"embeddings.position_ids"}


def check_tower(vision: nn.Module) -> None:
    """Refuse open_clip towers that a ``CLIPVisionModel`` does not compute."""
    if not isinstance(vision, VisionTransformer):
        raise ValueError(
            f"cannot convert {type(vision).__name__}: not an open_clip VisionTransformer "
            "(model.encoder.arch must be an open_clip ViT, e.g. ViT-L-14-quickgelu)"
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
        raise ValueError(
            f"cannot convert this CLIP tower to transformers' CLIPVisionModel: {found} "
            "(model.encoder.arch must be a plain OpenAI-style ViT, e.g. ViT-L-14-quickgelu)"
        )


def hidden_act(vision: VisionTransformer) -> str:
    act = vision.transformer.resblocks[0].mlp.gelu
    if isinstance(act, QuickGELU):  # OpenAI's CLIP weights were trained with it
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ValueError(
        f"cannot convert CLIP activation {act!r}: transformers needs gelu or quick_gelu"
    )


def clip_vision_config(encoder: ExemplarEncoder) -> CLIPVisionConfig:
    """The ``CLIPVisionConfig`` computing ``encoder.vision``, sized for ``encoder``'s head."""
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


def vision_to_transformers(state: Mapping[str, torch.Tensor], layers: int) -> Tensors:
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


def vision_from_transformers(
    state: Mapping[str, torch.Tensor], vision: nn.Module, source: str
) -> Tensors:
    """transformers ``CLIPVisionTransformer`` weights -> the open_clip tower ``vision``'s names.

    ``source`` names where the weights come from, in errors.
    """
    plan = _vision_plan(vision)
    wanted = {theirs for parts in plan.values() for theirs in parts}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted - IGNORED_TRANSFORMERS_KEYS)
    if missing or unexpected:
        raise ValueError(
            f"the CLIP vision weights in {source} do not fit model.encoder.arch: "
            f"{len(missing)} missing {missing[:10]}, {len(unexpected)} unexpected "
            f"{unexpected[:10]}"
        )
    return {
        name: torch.cat([state[t] for t in parts]) if len(parts) > 1 else state[parts[0]]
        for name, parts in plan.items()
    }


def _vision_plan(vision: nn.Module) -> dict[str, list[str]]:
    """open_clip name -> the transformers names that, concatenated along dim 0, rebuild it.

    Derived from :func:`vision_to_transformers`: each open_clip tensor becomes a probe
    ``[3i, 3i+1, 3i+2]``, and where those values land after the conversion says where tensor
    i went (whole, or as row blocks).
    """
    check_tower(vision)
    names = list(vision.state_dict())
    probes = {name: torch.arange(3 * i, 3 * i + 3) for i, name in enumerate(names)}
    converted = vision_to_transformers(probes, len(vision.transformer.resblocks))
    pieces: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for theirs, probe in converted.items():
        pieces[names[int(probe[0]) // 3]].append((int(probe[0]), theirs))
    plan = {name: [theirs for _, theirs in sorted(pieces[name])] for name in names}
    for name, parts in plan.items():
        # Anything but renames and row splits (a transpose, a dropped tensor) would not
        # reassemble into its probe: refuse rather than load scrambled weights.
        if not parts or not torch.equal(torch.cat([converted[t] for t in parts]), probes[name]):
            raise RuntimeError(f"vision_to_transformers is not invertible for {name}")
    return plan
