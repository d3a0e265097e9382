"""The exemplar encoder's frozen vision towers: one loader per library, one readout per kind.

Families (``model.encoder.family``; ``encoder_weights.FAMILIES``):

- ``clip``: an open_clip ``VisionTransformer`` (OpenAI CLIP ViT-L/14, OpenCLIP ViT-H/14), built
  by open_clip from a model name + local weights file or a ``local-dir:`` folder.
- ``siglip``: an open_clip SigLIP model, whose tower is a timm ViT without a class token and
  with an attention-pool (MAP) head (open_clip's ``TimmModel``), built the same way.
- ``dinov2``: a timm ``VisionTransformer`` (DINOv2), built by timm from a model name + local
  weights file (``pretrained_cfg_overlay=dict(file=...)``) or a ``local-dir:`` folder
  (``config.json`` + ``model.safetensors``, timm's own format).

Whatever the family, a readout gives the tower's own pooled image embedding before any
projection (CLIP: the class token after ``ln_post``; SigLIP: the MAP head's output; DINOv2:
the class token after the final norm) and its patch tokens after the final norm (class and
register tokens left out), all ``width`` wide. The open_clip CLIP ViT itself becomes
``encoder.vision``, so its state-dict names stay open_clip's (``convert/`` maps them to
transformers'); timm towers are wrapped (:class:`TimmTokens`, ``encoder.vision.model.*``).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import open_clip
import timm
import torch
from open_clip.timm_model import TimmModel
from open_clip.transform import PreprocessCfg
from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from pbe_lightning.models.encoder_weights import family_of, local_folder, weights_problems
from pbe_lightning.safe_load import check_loadable

PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")  # what torch.load reads (not .safetensors)
WEIGHTS_FIX = "or use model/encoder=tiny"  # the fix every missing-weights message ends with


# -- loading ---------------------------------------------------------------------------------
class _BelowWarningFrom(logging.Filter):
    """Drops records under WARNING whose source file lies in ``folder``."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = str(folder)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.folder)


@contextmanager
def open_clip_infos_hidden():
    """While open_clip creates a model, its ~9 INFO lines are dropped; its warnings still show.

    open_clip logs through the root logger itself (``logging.info``), so no logger's level
    can single it out. A filter on the root logger sees only records logged on that logger
    directly (not those propagated from named loggers), and this one drops open_clip's."""
    root = logging.getLogger()
    hidden = _BelowWarningFrom(Path(open_clip.__file__).parent)
    root.addFilter(hidden)
    try:
        yield
    finally:
        root.removeFilter(hidden)


@contextmanager
def timm_infos_hidden():
    """While timm loads weights, its INFO lines ("Loading pretrained weights from ...") are
    dropped; its warnings still show. timm logs through named loggers under ``timm``."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def check_weights_safe(files: list[Path]) -> None:
    """Refuse, in one line, a weight file that would run code, before the library reads it.

    open_clip 3.x and timm read them with ``torch.load(weights_only=True)``, and open_clip 2.x,
    which had no ``local-dir:``, did not; this check makes the refusal ours, naming the file
    and the type it holds, whatever the library does next.
    """
    for file in files:
        check_loadable(file)


def check_weights(family: str, arch: str, checkpoint: str | None) -> None:
    """The files ``arch`` / ``checkpoint`` name exist and hold no code; else one line each."""
    problems = weights_problems(family, arch, checkpoint, WEIGHTS_FIX)
    if problems:
        raise FileNotFoundError("\n".join(problems))
    folder = local_folder(arch)
    files = [f for f in folder.iterdir()] if folder else [Path(str(checkpoint))]
    check_weights_safe([f for f in files if f.suffix in PICKLED_WEIGHTS])


def load_clip_vision(arch: str, checkpoint: str | None) -> tuple[nn.Module, dict]:
    """open_clip vision tower from local weights only; returns it and its preprocess config.

    ``arch`` is an open_clip model name (weights from ``checkpoint``, a local file) or
    ``local-dir:/folder`` (``open_clip_config.json`` + weights). Hub tags are refused: they
    would download, and a training job must not depend on the network. Weight files are read
    weights-only: one holding other objects is refused (``safe_load``).
    """
    visual = open_clip_tower(arch, checkpoint, "clip")
    return visual, dict(visual.preprocess_cfg)


def open_clip_tower(
    arch: str,
    checkpoint: str | None,
    family: str,
    image_size: int | None = None,
    load_weights: bool = True,
) -> nn.Module:
    """The vision tower (``model.visual``) of an open_clip model; the text tower is dropped.
    ``load_weights=False`` builds it from its config alone, randomly initialised."""
    if not load_weights:
        return _open_clip_skeleton(arch, image_size)
    check_weights(family, arch, checkpoint)
    options = {"weights_only": True, "force_image_size": image_size}
    if local_folder(arch) is None:
        options["pretrained"] = checkpoint
    try:
        with open_clip_infos_hidden():
            model = open_clip.create_model(arch, **options)
    except RuntimeError as error:
        raise RuntimeError(
            f"the weights at {checkpoint or arch} do not fit model.encoder.arch={arch}: {error}"
        ) from error
    return model.visual


def _open_clip_skeleton(arch: str, image_size: int | None) -> nn.Module:
    """The tower from its model config alone (no weights, no device moves: it builds under a
    fake-tensor mode too, as the memory planner needs)."""
    folder = local_folder(arch)
    config = json.loads((folder / "open_clip_config.json").read_text()) if folder else {}
    model_cfg = dict(config.get("model_cfg") or open_clip.get_model_config(arch) or {})
    if not model_cfg:
        raise ValueError(
            f"model.encoder.arch={arch} is not an open_clip model name (open_clip.list_models() "
            "lists them), nor local-dir:/folder"
        )
    if image_size:
        model_cfg["vision_cfg"] = {**model_cfg["vision_cfg"], "image_size": image_size}
    kind = open_clip.CustomTextCLIP if model_cfg.pop("custom_text", False) else open_clip.CLIP
    visual = kind(**model_cfg).visual
    visual.preprocess_cfg = {**asdict(PreprocessCfg()), **config.get("preprocess_cfg", {})}
    return visual


def timm_tower(
    arch: str,
    checkpoint: str | None,
    family: str,
    image_size: int | None = None,
    load_weights: bool = True,
) -> nn.Module:
    """A timm model without its classifier, from a name + local file or a ``local-dir:``
    folder; ``image_size`` resizes it (timm resamples the position embedding on load)."""
    options: dict = {"num_classes": 0, "pretrained": load_weights}
    if image_size:
        options["img_size"] = image_size
    if load_weights:
        check_weights(family, arch, checkpoint)
        if local_folder(arch) is None:
            options["pretrained_cfg_overlay"] = {"file": str(checkpoint)}
    try:
        with timm_infos_hidden():
            return timm.create_model(arch, **options)
    except RuntimeError as error:
        if str(error).startswith("Unknown model"):
            raise ValueError(
                f"model.encoder.arch={arch} is not a timm model name (timm.list_models("
                "'*dinov2*') lists them), nor local-dir:/folder"
            ) from None
        raise RuntimeError(
            f"the weights at {checkpoint or arch} do not fit model.encoder.arch={arch}: {error}"
        ) from error


LOADERS = {"open_clip": open_clip_tower, "timm": timm_tower}


def load_tower(
    family: str,
    arch: str,
    checkpoint: str | None = None,
    image_size: int | None = None,
    load_weights: bool = True,
) -> nn.Module:
    """The frozen tower of ``family`` (see the module docstring), checked to be of that kind."""
    library = family_of(family).library
    tower = LOADERS[library](arch, checkpoint, family, image_size, load_weights)
    check_family(tower, family, arch)
    return tower


# -- what a tower is -------------------------------------------------------------------------
class TimmTokens(nn.Module):
    """A timm ViT (or open_clip's SigLIP wrapper of one) answering ``(pooled, patches)`` in one
    call, as open_clip's ViT does: its own pooled output (class token or MAP head, after the
    final norm, before any classifier) and the patch tokens after the prefix (class, register)
    tokens. One call of one module, so hooks on the frozen tower see its inputs and outputs
    (``callbacks.frozen_dtype`` casts there); timm's own ``forward`` returns the pooled output
    alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner = trunk(self.model)
        features = inner.forward_features(pixels)
        pooled = inner.forward_head(features, pre_logits=True)
        return pooled, features[:, inner.num_prefix_tokens :]


def library_module(tower: nn.Module) -> nn.Module:
    """The module the library built (open_clip's or timm's), unwrapped from :class:`TimmTokens`."""
    return tower.model if isinstance(tower, TimmTokens) else tower


def trunk(tower: nn.Module) -> nn.Module:
    """The timm ViT inside a tower (open_clip's SigLIP wraps one), or the tower itself."""
    tower = library_module(tower)
    return tower.trunk if isinstance(tower, TimmModel) else tower


def kind_of(tower: nn.Module) -> str | None:
    """The family a built tower belongs to, from its structure; None if no family fits."""
    tower = library_module(tower)
    if isinstance(tower, OpenClipViT):
        return "clip"
    inner = trunk(tower)
    if not isinstance(inner, TimmViT):
        return None
    if isinstance(tower, TimmModel) and getattr(inner, "attn_pool", None) is not None:
        return "siglip"
    if not isinstance(tower, TimmModel) and inner.cls_token is not None:
        return "dinov2"
    return None


EXPECTED = {
    "clip": "an open_clip CLIP ViT (e.g. ViT-L-14-quickgelu, ViT-H-14)",
    "siglip": "an open_clip SigLIP model (a timm tower with an attention-pool head, e.g. "
    "ViT-SO400M-14-SigLIP)",
    "dinov2": "a timm ViT with a class token (e.g. vit_large_patch14_dinov2.lvd142m)",
}


def check_family(tower: nn.Module, family: str, arch: str) -> None:
    found = kind_of(tower)
    if found != family:
        built = f"a {found} tower" if found else f"a {type(tower).__name__}"
        raise ValueError(
            f"model.encoder.family={family} needs {EXPECTED[family]}, but model.encoder.arch="
            f"{arch} built {built}: set model.encoder.family (or model/encoder) to match the "
            "weights"
        )


def tower_image_size(tower: nn.Module) -> int:
    """The square input side (``image_size`` is an int or a pair)."""
    inner = trunk(tower)
    size = inner.patch_embed.img_size if isinstance(inner, TimmViT) else tower.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def tower_grid(tower: nn.Module) -> tuple[int, int]:
    """Patch tokens per column and row."""
    inner = trunk(tower)
    grid = inner.patch_embed.grid_size if isinstance(inner, TimmViT) else tower.grid_size
    return int(grid[0]), int(grid[1])


def tower_shape(tower: nn.Module) -> tuple[int, int]:
    """Token width and number of transformer blocks."""
    inner = trunk(tower)
    if isinstance(inner, TimmViT):
        return int(inner.embed_dim), len(inner.blocks)
    return int(tower.transformer.width), len(tower.transformer.resblocks)


def tower_normalisation(tower: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the tower was trained with, as its library recorded them."""
    cfg = getattr(library_module(tower), "preprocess_cfg", None) or trunk(tower).pretrained_cfg
    return tuple(cfg["mean"]), tuple(cfg["std"])


def token_tower(tower: nn.Module) -> nn.Module:
    """``tower`` frozen, in eval, and answering ``(pooled (B, W), patches (B, N, W))`` when
    called: an open_clip ViT without its projection, tokens out (kept as it is, so that
    ``convert/`` reads open_clip's names), a timm one wrapped in :class:`TimmTokens`."""
    if isinstance(tower, OpenClipViT):
        tower.proj = None  # the bottleneck is the pre-projection pooled token
        tower.output_tokens = True
    elif kind_of(tower) is not None:
        tower = tower if isinstance(tower, TimmTokens) else TimmTokens(tower)
    else:
        raise ValueError(
            f"no tokens from a {type(tower).__name__} tower: use a model/encoder family"
        )
    return tower.requires_grad_(False).eval()
