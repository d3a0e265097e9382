"""The exemplar encoder: frozen vision tower -> information bottleneck -> trainable mapper.

Paint by Example conditions the UNet on ONE vector: CLIP's pooled class token (after
``ln_post``, before CLIP's projection). Squeezing the exemplar through it is what stops the
model from copy-pasting. Two ablation axes:

- the bottleneck (``model.encoder.bottleneck``): ``cls`` (the paper: the tower's pooled token
  alone), ``tokens`` (the pooled token + every patch token: no bottleneck), ``pooled_k`` (the
  pooled token + ``model.encoder.pooled_tokens`` = K patch tokens average-pooled on a
  sqrt(K) x sqrt(K) grid: a bottleneck K + 1 tokens wide);
- the tower (``model.encoder.family``): ``clip`` (OpenAI CLIP ViT-L/14, the paper's; OpenCLIP
  ViT-H/14), ``siglip`` (SigLIP So400m/14: no class token, its pooled token is the
  attention-pool head's output) or ``dinov2`` (DINOv2, as AnyDoor: the class token after the
  final norm); ``towers.py`` loads them from local weights only.

The mapper is as wide as the tower's tokens; ``proj_out`` maps them to the UNet's context
width. Submodule names (``mapper.blocks``, ``final_layer_norm``, ``proj_out``,
``uncond_vector``) follow diffusers' ``PaintByExampleImageEncoder`` so export is a rename-free
copy.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from pbe_lightning.models.towers import (
    PICKLED_WEIGHTS,
    check_weights_safe,
    load_clip_vision,
    load_tower,
    open_clip_infos_hidden,
    token_tower,
    tower_grid,
    tower_image_size,
    tower_normalisation,
    tower_shape,
)

# Re-exported: metrics, the planner and the benches read CLIP towers through this module.
__all__ = [
    "PICKLED_WEIGHTS",
    "Bottleneck",
    "ExemplarEncoder",
    "Mapper",
    "build_exemplar_encoder",
    "check_weights_safe",
    "clip_image_size",
    "load_clip_vision",
    "open_clip_infos_hidden",
]

Bottleneck = Literal["cls", "tokens", "pooled_k"]
BOTTLENECKS = ("cls", "tokens", "pooled_k")
clip_image_size = tower_image_size  # the name from when every tower was CLIP's


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


def pooled_grid_side(pooled_tokens: int, grid: tuple[int, int]) -> int:
    """sqrt(K) for ``bottleneck=pooled_k``; K must be a square the patch grid can be pooled to."""
    side = math.isqrt(pooled_tokens) if isinstance(pooled_tokens, int) else 0
    if side < 1 or side * side != pooled_tokens or side > min(grid):
        raise ValueError(
            f"model.encoder.pooled_tokens={pooled_tokens}: use a square number of tokens up to "
            f"the tower's {grid[0]}x{grid[1]} patch grid, e.g. 4 (2x2) or 16 (4x4)"
        )
    return side


class ExemplarEncoder(nn.Module):
    """Exemplar images -> the UNet's cross-attention context ``(B, T, context_dim)``.

    ``vision``: a frozen tower of ``family`` (``towers.py``), ``width`` its token width;
    ``image_size``, ``mean``, ``std``: its input side and normalisation. The bottleneck picks
    the T tokens the trainable mapper sees (the module docstring).
    """

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
        *,
        pooled_tokens: int = 4,
        family: str = "clip",
    ) -> None:
        super().__init__()
        if bottleneck not in BOTTLENECKS:
            raise ValueError(
                f"model.encoder.bottleneck={bottleneck!r}: use 'cls' (paper), 'tokens' or "
                "'pooled_k' (with model.encoder.pooled_tokens=K)"
            )
        self.vision = token_tower(vision)  # frozen; called: (pooled, patch tokens)
        self.family = family
        self.bottleneck = bottleneck
        self.image_size = image_size
        self.grid = tower_grid(self.vision)
        self.pooled_side = (
            pooled_grid_side(pooled_tokens, self.grid) if bottleneck == "pooled_k" else 0
        )
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

    @property
    def context_tokens(self) -> int:
        """T, the number of context tokens per exemplar: 1 (cls), 1 + K (pooled_k), 1 + N."""
        if self.bottleneck == "cls":
            return 1
        if self.bottleneck == "pooled_k":
            return 1 + self.pooled_side**2
        return 1 + self.grid[0] * self.grid[1]

    def tower_features(self, reference: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> frozen tower tokens ``(B, T, width)``, the pooled one
        first."""
        if reference.shape[-1] != self.image_size or reference.shape[-2] != self.image_size:
            size = (self.image_size, self.image_size)
            reference = nn.functional.interpolate(reference, size, mode="bicubic", antialias=True)
        pixels = (reference - self.mean) / self.std
        with torch.no_grad():
            pooled, patches = self.vision(pixels)
        if self.bottleneck == "cls":
            return pooled[:, None]
        if self.bottleneck == "pooled_k":
            patches = self.pool_patches(patches)
        return torch.cat([pooled[:, None], patches], dim=1)

    clip_features = tower_features  # the name from when every tower was CLIP's

    def pool_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, N, W)`` patch tokens -> ``(B, K, W)``: averages over a sqrt(K)^2 grid of
        regions, row by row, so each token still says where in the exemplar it looked."""
        batch, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, width, *self.grid)
        side = (self.pooled_side, self.pooled_side)
        return nn.functional.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        """Exemplar images in [0, 1] -> cross-attention context ``(B, T, context_dim)``."""
        tokens = self.mapper(self.tower_features(reference))
        return self.proj_out(self.final_layer_norm(tokens))

    def unconditional(self, batch_size: int, tokens: int) -> torch.Tensor:
        return self.uncond_vector.expand(batch_size, tokens, -1)

    def architecture(self) -> dict:
        """What a resumed run must share with its checkpoint, keyed by the setting to change
        (``PaintByExampleModule.architecture``); read from the built modules."""
        width, layers = tower_shape(self.vision)
        return {
            "model.encoder.family": self.family,
            "model.encoder.bottleneck": self.bottleneck,
            "model.encoder (context tokens)": self.context_tokens,
            "model.encoder.mapper_depth": len(self.mapper.blocks),
            "model.encoder (tower width x layers)": [width, layers],
            "model.encoder (tower image size)": self.image_size,
        }


def build_exemplar_encoder(
    arch: str,
    context_dim: int,
    checkpoint: str | None = None,
    bottleneck: Bottleneck = "cls",
    mapper_depth: int = 5,
    *,
    family: str = "clip",
    pooled_tokens: int = 4,
    image_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    load_weights: bool = True,
) -> ExemplarEncoder:
    """Factory used by the config (``model/encoder``); ``context_dim`` comes from the UNet.

    ``arch`` + ``checkpoint`` (a local file), or ``arch=local-dir:/folder``, name the tower of
    ``family`` (``towers.py``). ``image_size`` resizes it (None: its own), ``mean`` / ``std``
    replace the normalisation its library recorded (open_clip knows SigLIP's only from a hub
    tag, which is never used). ``load_weights=False`` reads configs only and leaves the tower
    random: for planning memory, never for training.
    """
    vision = load_tower(family, arch, checkpoint, image_size, load_weights)
    width, _ = tower_shape(vision)
    own_mean, own_std = tower_normalisation(vision)
    return ExemplarEncoder(
        vision,
        width,
        context_dim,
        tower_image_size(vision),
        tuple(mean or own_mean),
        tuple(std or own_std),
        bottleneck,
        mapper_depth,
        pooled_tokens=pooled_tokens,
        family=family,
    )
