"""diffusers <-> original CompVis/LDM key layout for Stable Diffusion v1 UNet and VAE weights.

LDM -> diffusers is diffusers' own ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``
(:func:`unet_from_ldm`, :func:`vae_from_ldm`); :func:`unet_to_ldm` / :func:`vae_to_ldm` are their
inverse: we train with diffusers modules but ship single-file checkpoints that LDM-style tooling
(the official Paint-by-Example repository among them) loads directly. Tensors are passed
through untouched (only VAE attention weights get a reshaped view), so a round trip through
diffusers' forward converters is bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "class_embedding": "label_emb",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

_UNET_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
    r"\.(\d+)\.(.+)"
)
_VAE_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _rename(tail: str, table: Mapping[str, str], strict: bool = False) -> str:
    module, _, param = tail.rpartition(".")
    if strict and module not in table:
        raise KeyError(module)
    return f"{table.get(module, module)}.{param}"


def _unet_key(key: str, layers: int, up_with_attn: set[int]) -> str:
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    # LDM numbers blocks flat: each level owns `layers` slots (+1 for its down/upsampler or,
    # on the way up, the extra skip resnet), and input slot 0 is conv_in.
    if m := _UNET_BLOCK.fullmatch(key):
        kind, level, part, n, tail = m[1], int(m[2]), m[3], int(m[4]), m[5]
        stride = layers + 1
        if kind == "down":
            i = 1 + level * stride + n
            if part == "downsamplers":
                return f"input_blocks.{1 + level * stride + layers}.0.op.{param}"
            sub = "input_blocks"
        else:
            i = level * stride + n
            if part == "upsamplers":
                # The upsampler sits after the attention module when the level has one.
                slot = 2 if level in up_with_attn else 1
                return f"output_blocks.{level * stride + layers}.{slot}.conv.{param}"
            sub = "output_blocks"
        if part == "resnets":
            return f"{sub}.{i}.0.{_rename(tail, _UNET_RESNET, strict=True)}"
        return f"{sub}.{i}.1.{tail}"
    if m := _MID.fullmatch(key):
        # LDM interleaves resnet, attention, resnet, ... inside one Sequential.
        n = int(m[2])
        if m[1] == "resnets":
            return f"middle_block.{2 * n}.{_rename(m[3], _UNET_RESNET, strict=True)}"
        return f"middle_block.{2 * n + 1}.{m[3]}"
    raise KeyError(f"no LDM equivalent for UNet key {key!r}")


def _vae_key(key: str, num_up: int) -> str:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    coder, _, rest = key.partition(".")
    module, _, param = rest.rpartition(".")
    if coder in ("encoder", "decoder"):
        if module in ("conv_in", "conv_out"):
            return key
        if module == "conv_norm_out":
            return f"{coder}.norm_out.{param}"
        if m := _VAE_BLOCK.fullmatch(rest):
            kind, level, part, n, tail = m[1], int(m[2]), m[3], int(m[4]), m[5]
            # LDM indexes decoder levels by resolution (0 = full res); diffusers by execution order.
            if kind == "up":
                level = num_up - 1 - level
            if part == "resnets":
                return f"{coder}.{kind}.{level}.block.{n}.{_rename(tail, _VAE_RESNET)}"
            return f"{coder}.{kind}.{level}.{kind}sample.{tail}"
        if m := _MID.fullmatch(rest):
            n = int(m[2]) + 1
            if m[1] == "resnets":
                return f"{coder}.mid.block_{n}.{_rename(m[3], _VAE_RESNET)}"
            return f"{coder}.mid.attn_{n}.{_rename(m[3], _VAE_ATTN, strict=True)}"
    raise KeyError(f"no LDM equivalent for VAE key {key!r}")


def _checked_put(out: dict[str, torch.Tensor], key: str, tensor: torch.Tensor) -> None:
    # A silent overwrite would drop weights (e.g. class_embedding and add_embedding both map to
    # label_emb), so treat any collision as a bug.
    if key in out:
        raise ValueError(f"two diffusers keys map to LDM key {key!r}")
    out[key] = tensor


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Diffusers ``UNet2DConditionModel`` state dict -> ``model.diffusion_model.*`` LDM keys."""
    layers = config["layers_per_block"]
    # Per-level block counts (SDXL-style tuples) have no flat LDM numbering that diffusers'
    # forward converter understands, so refuse instead of writing an unloadable checkpoint.
    if not isinstance(layers, int):
        raise TypeError(f"layers_per_block must be an int, got {layers!r}")
    up_with_attn = {
        int(m[1]) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        _checked_put(out, UNET_PREFIX + _unet_key(key, layers, up_with_attn), tensor)
    return out


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> ``first_stage_model.*`` LDM keys."""
    num_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = _vae_key(key, num_up)
        # LDM's VAE attention uses 1x1 convs where diffusers uses Linear.
        if ".mid.attn_" in new_key and new_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        _checked_put(out, VAE_PREFIX + new_key, tensor)
    return out


def unet_from_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping
) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` LDM keys (other keys ignored) -> diffusers UNet names.

    ``config`` is the ``UNet2DConditionModel`` config the weights are meant for.
    """
    return convert_ldm_unet_checkpoint(state_dict, dict(config))


def vae_from_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping
) -> dict[str, torch.Tensor]:
    """``first_stage_model.*`` LDM keys (other keys ignored) -> diffusers VAE names."""
    return convert_ldm_vae_checkpoint(state_dict, dict(config))
