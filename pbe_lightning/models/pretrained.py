"""Start training from a trained Paint-by-Example model: ``model.init_from`` (experiment=finetune).

Two sources, both read into the module's own state-dict names:

- the official release's single file (``model.ckpt`` of Fantasy-Studio/Paint-by-Example, or the
  same tensors as ``.safetensors``), in its LDM layout;
- a diffusers ``PaintByExamplePipeline`` folder (``pbe_lightning.export`` writes one).

The architecture still comes from ``model.backbone`` and ``model.encoder``: for the official
weights that is SD 1.x (the packaged default ``model.backbone.config``) and
``model.encoder.arch=ViT-L-14-quickgelu`` with ``mapper_depth=5``. Every tensor of the built
module is then replaced, the frozen VAE and CLIP tower included.

Official layout, from ``ldm/models/diffusion/ddpm.py`` (``LatentDiffusion``) and
``ldm/modules/encoders/modules.py`` (``FrozenCLIPImageEmbedder``, GLIDE's ``xf.Transformer``) of
github.com/Fantasy-Studio/Paint-by-Example; diffusers'
``convert_from_ckpt.convert_paint_by_example_checkpoint`` reads the same names:

    model.diffusion_model.*                        UNet, 9 input channels
    first_stage_model.*                            VAE
    cond_stage_model.transformer.vision_model.*    transformers CLIPVisionModel (ViT-L/14)
    cond_stage_model.mapper.resblocks.{i}.*        attn.c_qkv, attn.c_proj, ln_1, mlp.c_fc,
                                                   mlp.c_proj, ln_2
    cond_stage_model.final_ln.*                    LayerNorm
    proj_out.*                                     Linear(1024, 768), on LatentDiffusion itself
    learnable_vector                               (1, 1, 768) unconditional context
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pbe_lightning.export import HEAD_PREFIXES, check_tower, convert_vision, load_pipeline
from pbe_lightning.models.backbone import SINGLE_FILE_SUFFIXES, read_state_dict
from pbe_lightning.models.ldm_layout import UNET_PREFIX, VAE_PREFIX, unet_to_ldm, vae_to_ldm
from pbe_lightning.models.module import PaintByExampleModule

Tensors = dict[str, torch.Tensor]

FIX = (
    "pass model.init_from=<official Paint-by-Example .ckpt/.safetensors, or a "
    "PaintByExamplePipeline folder>"
)
CLIP_PREFIX = "cond_stage_model.transformer."
MAPPER_PREFIX = "cond_stage_model.mapper.resblocks."
# Official mapper block (GLIDE ResidualAttentionBlock) -> diffusers BasicTransformerBlock.
MAPPER_RENAMES = {
    "attn.c_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.c_proj": ("attn1.to_out.0",),
    "ln_1": ("norm1",),
    "ln_2": ("norm3",),
    "mlp.c_fc": ("ff.net.0.proj",),
    "mlp.c_proj": ("ff.net.2",),
}
HEAD_RENAMES = {
    "cond_stage_model.final_ln.": "final_layer_norm.",
    "proj_out.": "proj_out.",
    "learnable_vector": "uncond_vector",
}
# Persistent in the transformers 4.x the official model was saved with; recomputed now.
IGNORED_CLIP_KEYS = {"embeddings.position_ids"}


def init_source(cfg: DictConfig) -> str | None:
    """``model.init_from``, checked before anything loads; experiment=finetune requires it.

    Checked here because experiment=finetune also builds the backbone from it, whose own
    error would point at model.backbone.path instead.
    """
    if OmegaConf.is_missing(cfg, "init_from"):
        raise ValueError(f"experiment=finetune needs the weights to start from: {FIX}")
    path = cfg.get("init_from")
    if path and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"no weights at {path} (model.init_from): {FIX}")
    return path


def init_weights(module: PaintByExampleModule, path: str | Path) -> None:
    """Overwrite every weight of ``module`` with those at ``path``, checked key by key first."""
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
        raise ValueError(
            f"the weights at {source} (model.init_from) do not fit the model built from "
            f"model.backbone and model.encoder: {len(missing)} missing {missing[:10]}, "
            f"{len(unexpected)} unexpected {unexpected[:10]}, {len(reshaped)} of another shape "
            f"{reshaped[:10]}. The architecture comes from those configs: set model.backbone"
            ".config (single files) and model.encoder.arch / mapper_depth to match the weights"
        )


# -- official single file ----------------------------------------------------------------------
def _from_official_file(file: Path, module: PaintByExampleModule) -> Tensors:
    state = _read(file)
    needed = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, MAPPER_PREFIX)
    absent = [p for p in needed if not any(k.startswith(p) for k in state)]
    if absent:
        raise ValueError(
            f"{file} (model.init_from) has no {[p + '*' for p in absent]} keys, so it is not an "
            f"official Paint-by-Example checkpoint (Stable Diffusion weights go to "
            f"model.backbone.path instead): {FIX}"
        )
    try:
        unet = convert_ldm_unet_checkpoint(state, dict(module.unet.config))
        vae = convert_ldm_vae_checkpoint(state, dict(module.vae.config))
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"the UNet / VAE in {file} (model.init_from) do not fit model.backbone's "
            f"architecture ({error!r}): set model.backbone.config to match"
        ) from None
    clip = _strip(state, CLIP_PREFIX)
    clip = _strip(clip, "vision_model.") or clip  # transformers 5 saves CLIPVisionModel flat
    return {
        **_prefixed("unet.", unet),
        **_prefixed("vae.", vae),
        **_prefixed("encoder.vision.", vision_from_transformers(clip, module, file)),
        **_prefixed("encoder.mapper.blocks.", mapper_from_official(_strip(state, MAPPER_PREFIX))),
        **_prefixed("encoder.", _renamed(state, HEAD_RENAMES)),
    }


def _read(file: Path) -> Tensors:
    try:
        return read_state_dict(file)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{file} (model.init_from) holds pickled objects besides tensors, which are not "
            "loaded (torch.load weights_only=True): re-save its 'state_dict' as .safetensors "
            f"where you trust the file ({str(error).splitlines()[0]})"
        ) from None


def mapper_from_official(state: Mapping[str, torch.Tensor]) -> Tensors:
    """``{i}.attn.c_qkv.weight``... (GLIDE blocks) -> ``{i}.attn1.to_q.weight``... (diffusers)."""
    out = {}
    for key, tensor in state.items():
        index, _, rest = key.partition(".")
        name, _, kind = rest.rpartition(".")
        if name not in MAPPER_RENAMES:
            raise ValueError(f"unknown mapper weight {MAPPER_PREFIX}{key} (model.init_from)")
        targets = MAPPER_RENAMES[name]
        # GLIDE splits c_qkv per head as [q | k | v]; with the mapper's single head that is
        # three equal row blocks, which is what diffusers' own converter assumes too.
        for target, part in zip(targets, tensor.chunk(len(targets))):
            out[f"{index}.{target}.{kind}"] = part
    return out


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


# -- transformers CLIPVisionModel -> open_clip VisionTransformer -------------------------------
def vision_from_transformers(
    state: Mapping[str, torch.Tensor], module: PaintByExampleModule, source: str | Path
) -> Tensors:
    """transformers ``CLIPVisionTransformer`` weights -> ``module``'s open_clip tower names."""
    plan = _vision_plan(module.encoder.vision)
    wanted = {theirs for parts in plan.values() for theirs in parts}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted - IGNORED_CLIP_KEYS)
    if missing or unexpected:
        raise ValueError(
            f"the CLIP vision weights in {source} (model.init_from) do not fit "
            f"model.encoder.arch: {len(missing)} missing {missing[:10]}, {len(unexpected)} "
            f"unexpected {unexpected[:10]}"
        )
    return {
        name: torch.cat([state[t] for t in parts]) if len(parts) > 1 else state[parts[0]]
        for name, parts in plan.items()
    }


def _vision_plan(vision: nn.Module) -> dict[str, list[str]]:
    """open_clip name -> the transformers names that, concatenated along dim 0, rebuild it.

    Derived from ``export.convert_vision`` instead of a second table that could drift from
    it: each open_clip tensor becomes a probe ``[3i, 3i+1, 3i+2]``, and where those values
    land after the conversion says where tensor i went (whole, or as row blocks).
    """
    check_tower(vision)
    names = list(vision.state_dict())
    probes = {name: torch.arange(3 * i, 3 * i + 3) for i, name in enumerate(names)}
    converted = convert_vision(probes, len(vision.transformer.resblocks))
    pieces: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for theirs, probe in converted.items():
        pieces[names[int(probe[0]) // 3]].append((int(probe[0]), theirs))
    plan = {name: [theirs for _, theirs in sorted(pieces[name])] for name in names}
    for name, parts in plan.items():
        # Anything but renames and row splits (a transpose, a dropped tensor) would not
        # reassemble into its probe: refuse rather than load scrambled weights.
        if not parts or not torch.equal(torch.cat([converted[t] for t in parts]), probes[name]):
            raise RuntimeError(f"export.convert_vision is not invertible for {name}")
    return plan


# -- diffusers pipeline folder -----------------------------------------------------------------
def _from_pipeline_folder(folder: Path, module: PaintByExampleModule) -> Tensors:
    parts = ("model_index.json", "unet", "vae", "image_encoder", "scheduler", "feature_extractor")
    absent = [p for p in parts if not (folder / p).exists()]
    if absent:
        raise FileNotFoundError(
            f"{folder} (model.init_from) lacks {absent}, so it is not a PaintByExamplePipeline "
            f"folder (Stable Diffusion folders go to model.backbone.path instead): {FIX}"
        )
    # Stock loaders: they read every format diffusers wrote over the years (bin, safetensors,
    # older attention names) into today's names, which are our module's.
    pipe = load_pipeline(folder)
    encoder = pipe.image_encoder
    clip = getattr(encoder.model, "vision_model", encoder.model).state_dict()
    head = {k: v for k, v in encoder.state_dict().items() if k.startswith(HEAD_PREFIXES)}
    return {
        **_prefixed("unet.", pipe.unet.state_dict()),
        **_prefixed("vae.", pipe.vae.state_dict()),
        **_prefixed("encoder.vision.", vision_from_transformers(clip, module, folder)),
        **_prefixed("encoder.", head),
    }


# -- our module -> official layout ---------------------------------------------------------------
def to_official_layout(module: PaintByExampleModule) -> Tensors:
    """``module``'s weights under the official release's names (the inverse of the loader)."""
    encoder = module.encoder
    if encoder.bottleneck != "cls":
        raise ValueError("the official layout conditions on CLIP's class token: bottleneck=cls")
    check_tower(encoder.vision)
    state = encoder.state_dict()
    clip = convert_vision(_strip(state, "vision."), len(encoder.vision.transformer.resblocks))
    head = _renamed(state, {ours: theirs for theirs, ours in HEAD_RENAMES.items()})
    return {
        **unet_to_ldm(module.unet.state_dict(), module.unet.config),
        **vae_to_ldm(module.vae.state_dict(), module.vae.config),
        **_prefixed(CLIP_PREFIX + "vision_model.", clip),
        **_prefixed(MAPPER_PREFIX, mapper_to_official(_strip(state, "mapper.blocks."))),
        **head,
    }


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> Tensors:
    return {prefix + k: v for k, v in state.items()}


def _renamed(state: Mapping[str, torch.Tensor], prefixes: Mapping[str, str]) -> Tensors:
    """The tensors under the ``prefixes`` keys, those prefixes replaced by their values."""
    return {
        new + k[len(old) :]: v
        for old, new in prefixes.items()
        for k, v in state.items()
        if k.startswith(old)
    }
