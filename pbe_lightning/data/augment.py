"""Batched augmentation with Kornia, run after the batch reaches the accelerator.

The reference augmentation is what stops the model from learning to copy-paste the exemplar
(METHOD.md: flip, rotation, blur, elastic). An optional scene flip mirrors the source image and
its mask together. Each op has a probability; 0 switches it off, so ``data/augment=none`` is a
config with every probability at 0, not a code path.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


class Augment(nn.Module):
    def __init__(
        self,
        hflip: float = 0.5,
        rotation: float = 0.5,
        rotation_degrees: float = 20.0,
        blur: float = 0.3,
        blur_kernel: int = 7,
        elastic: float = 0.3,
        elastic_kernel: int = 63,
        elastic_sigma: float = 32.0,
        elastic_alpha: float = 1.0,
        color_jitter: float = 0.0,
        color_strength: float = 0.2,
        perspective: float = 0.0,
        scene_hflip: float = 0.0,
    ) -> None:
        super().__init__()
        ops: list[nn.Module] = []
        if hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=hflip))
        if rotation > 0:
            ops.append(K.RandomRotation(degrees=rotation_degrees, p=rotation))
        if perspective > 0:
            ops.append(K.RandomPerspective(distortion_scale=0.3, p=perspective))
        if color_jitter > 0:
            s = color_strength
            ops.append(K.ColorJitter(s, s, s, s / 4, p=color_jitter))
        if blur > 0:
            sigma = (0.1, max(0.2, blur_kernel / 3))
            ops.append(K.RandomGaussianBlur((blur_kernel, blur_kernel), sigma, p=blur))
        if elastic > 0:
            kernel = (elastic_kernel, elastic_kernel)
            sigma = (elastic_sigma, elastic_sigma)
            ops.append(
                K.RandomElasticTransform(kernel, sigma, (elastic_alpha, elastic_alpha), p=elastic)
            )
        self.reference_ops = K.AugmentationSequential(*ops) if ops else None
        self.scene_ops = (
            K.AugmentationSequential(
                K.RandomHorizontalFlip(p=scene_hflip), data_keys=["input", "mask"]
            )
            if scene_hflip > 0
            else None
        )

    def reference(self, reference: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1] -> same shape, augmented."""
        if self.reference_ops is None:
            return reference
        return self.reference_ops(reference).clamp(0, 1)

    def scene(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source image and its mask, transformed together so the hole stays aligned."""
        if self.scene_ops is None:
            return image, mask
        image, mask = self.scene_ops(image, mask)
        return image, mask
