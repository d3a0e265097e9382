"""The exemplar encoder: frozen CLIP vision tower -> information bottleneck -> trainable mapper.

Paint by Example conditions the UNet on ONE vector: CLIP's pooled class token (after
``ln_post``, before CLIP's projection). Squeezing the exemplar through it is what stops the
model from copy-pasting; ``bottleneck="tokens"`` keeps all patch tokens for the ablation.
Submodule names (``mapper.blocks``, ``final_layer_norm``, ``proj_out``, ``uncond_vector``)
follow diffusers' ``PaintByExampleImageEncoder`` so export is a rename-free copy.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import open_clip
import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

Bottleneck = Literal["cls", "tokens"]


class Mapper(nn.Module):
    """Residual transformer blocks on the exemplar token(s); one head, as in the paper."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(width, 1, width, activation_fn="gelu", attention_bias=True)
            for _ in range(depth)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


class ExemplarEncoder(nn.Module):
    def __init__(
        self,
        vision: nn.Module,
        width: int,
        context_dim: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        bottleneck: Bottleneck = "cls",
        mapper_depth: int = 5,
    ) -> None:
        super().__init__()
        if bottleneck not in ("cls", "tokens"):
            raise ValueError(
                f"model.encoder.bottleneck={bottleneck!r}: use 'cls' (paper) or 'tokens'"
            )
        vision.proj = None  # the bottleneck is the pre-projection pooled token
        vision.output_tokens = bottleneck == "tokens"
        self.vision = vision.requires_grad_(False).eval()
        self.bottleneck = bottleneck
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.mapper = Mapper(width, mapper_depth)
        self.final_layer_norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, context_dim)
        self.uncond_vector = nn.Parameter(torch.randn(1, 1, context_dim))

    def train(self, mode: bool = True) -> ExemplarEncoder:
        super().train(mode)
        self.vision.eval()  # frozen: dropout / norm statistics must not change
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            *self.mapper.parameters(),
            *self.final_layer_norm.parameters(),
            *self.proj_out.parameters(),
            self.uncond_vector,
        ]

    def clip_features(self, reference: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> frozen CLIP tokens ``(B, T, width)``, T = 1 for cls."""
        if reference.shape[-1] != self.image_size or reference.shape[-2] != self.image_size:
            size = (self.image_size, self.image_size)
            reference = nn.functional.interpolate(reference, size, mode="bicubic", antialias=True)
        pixels = (reference - self.mean) / self.std
        with torch.no_grad():
            out = self.vision(pixels)
        if self.bottleneck == "cls":
            return out[:, None]
        pooled, tokens = out
        return torch.cat([pooled[:, None], tokens], dim=1)

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        """Exemplar images in [0, 1] -> cross-attention context ``(B, T, context_dim)``."""
        tokens = self.mapper(self.clip_features(reference))
        return self.proj_out(self.final_layer_norm(tokens))

    def unconditional(self, batch_size: int, tokens: int) -> torch.Tensor:
        return self.uncond_vector.expand(batch_size, tokens, -1)


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


def load_clip_vision(arch: str, checkpoint: str | None) -> tuple[nn.Module, dict]:
    """open_clip vision tower from local weights only; returns it and its preprocess config.

    ``arch`` is an open_clip model name (weights from ``checkpoint``, a local file) or
    ``local-dir:/folder`` (``open_clip_config.json`` + weights). Hub tags are refused: they
    would download, and a training job must not depend on the network.
    """
    if arch.startswith("local-dir:"):
        folder = Path(arch.removeprefix("local-dir:"))
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"no open_clip model at {folder} (needs open_clip_config.json + weights): fix "
                "model.encoder.arch=local-dir:/path, or use model/encoder=tiny for a tiny test model"
            )
        with open_clip_infos_hidden():
            model = open_clip.create_model(arch)
    else:
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f"no CLIP weights at {checkpoint!r} for {arch}: pass "
                "model.encoder.checkpoint=/path/to/open_clip_pytorch_model.bin (a local file; hub "
                "tags are not downloaded), or use model/encoder=tiny"
            )
        try:
            with open_clip_infos_hidden():
                model = open_clip.create_model(arch, pretrained=checkpoint)
        except RuntimeError as error:
            raise RuntimeError(
                f"CLIP weights at {checkpoint} do not fit model.encoder.arch={arch}: {error}"
            ) from error
    visual = model.visual
    preprocess = dict(visual.preprocess_cfg)
    return visual, preprocess


def clip_image_size(visual: nn.Module) -> int:
    """The square input side of an open_clip vision tower (``image_size`` is an int or a pair)."""
    size = visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def build_exemplar_encoder(
    arch: str,
    context_dim: int,
    checkpoint: str | None = None,
    bottleneck: Bottleneck = "cls",
    mapper_depth: int = 5,
) -> ExemplarEncoder:
    """Factory used by the config (``model/encoder``); ``context_dim`` comes from the UNet."""
    visual, preprocess = load_clip_vision(arch, checkpoint)
    width = visual.transformer.width
    return ExemplarEncoder(
        visual,
        width,
        context_dim,
        clip_image_size(visual),
        tuple(preprocess["mean"]),
        tuple(preprocess["std"]),
        bottleneck,
        mapper_depth,
    )
