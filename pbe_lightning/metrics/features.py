"""CLIP image features as the paper's metrics compute them.

``encode_image`` features: the image tower's projected embedding, NOT L2-normalised (FID and
QS take them as they are; the region CLIP score normalises them for its cosine). Images are
preprocessed by the CLIP model's own evaluation transform as open_clip ships it: shorter side
to the input size (bicubic, on the 8-bit image with PIL), centre crop, mean/std. For OpenAI's
ViT-B/32 (``arch="ViT-B-32-quickgelu"`` plus its local weights file; plain ``ViT-B-32`` loads
those weights silently with the wrong activation) that is exactly ``clip.load``'s preprocess.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch import nn

from pbe_lightning.images import image_files, to_pil
from pbe_lightning.models.encoder import clip_image_size, load_clip_vision


class ClipFeatures(nn.Module):
    """A frozen open_clip image tower: images -> ``(B, D)`` raw ``encode_image`` features."""

    def __init__(self, visual: nn.Module, preprocess_cfg: dict) -> None:
        super().__init__()
        self.visual = visual.requires_grad_(False).eval()
        self.image_size = clip_image_size(visual)
        self.num_features = int(visual.output_dim)
        cfg = PreprocessCfg(**preprocess_cfg)
        # The model's evaluation transform on PIL images: what the public tools fed CLIP.
        self.transform = image_transform_v2(cfg, is_train=False)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def load(cls, arch: str, checkpoint: str | None = None) -> ClipFeatures:
        """``arch`` + local ``checkpoint`` file, or ``local-dir:/folder``; hub tags are refused."""
        visual, preprocess = load_clip_vision(arch, checkpoint)
        return cls(visual, preprocess)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def train(self, mode: bool = True) -> ClipFeatures:
        super().train(mode)
        self.visual.eval()  # a metric must not depend on dropout or the caller's mode
        return self

    def preprocess(self, images: Sequence[torch.Tensor | Image.Image]) -> torch.Tensor:
        """Images of any sizes (``(1, 3, H, W)`` / ``(3, H, W)``, float in [0, 1] or uint8, or
        PIL; a ``(B, 3, H, W)`` batch iterates as such) -> the normalised ``(B, 3, S, S)`` CLIP
        input. Float tensors are taken as the 8-bit images they round to: the public tools
        scored PNG files."""
        pils = [
            image if isinstance(image, Image.Image) else to_pil(eight_bit(image))
            for image in images
        ]
        return torch.stack([self.transform(image) for image in pils]).to(self.device)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1], already at the input size -> CLIP's normalised input."""
        return (pixels.to(self.device, torch.float32) - self.mean) / self.std

    @torch.no_grad()
    def encode(self, normalised: torch.Tensor) -> torch.Tensor:
        """Normalised CLIP input -> ``(B, D)`` float32 ``encode_image`` features (not unit norm)."""
        return self.visual(normalised.to(self.device)).float()

    def forward(self, images: Sequence[torch.Tensor | Image.Image]) -> torch.Tensor:
        return self.encode(self.preprocess(images))


def eight_bit(image: torch.Tensor) -> torch.Tensor:
    """uint8 tensors as floats in [0, 1]; float ones as they are."""
    return image.float() / 255 if image.dtype == torch.uint8 else image


def unit(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised features (our ``*_normalised`` variants, and the CLIP score's cosine)."""
    return torch.nn.functional.normalize(features.float(), dim=-1)


def folder_features(folder: str | Path, clip: ClipFeatures, batch_size: int = 32) -> torch.Tensor:
    """Raw CLIP features ``(N, D)`` of every image in ``folder``, in sorted file order."""
    files, chunks = image_files(folder), []
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            with Image.open(path) as image:
                batch.append(image.copy())  # in its own mode: the transform converts, as CLIP's
        chunks.append(clip(batch).cpu())
    return torch.cat(chunks)
