"""Region CLIP score: how much the painted region looks like the reference.

As the public tool computes it: the edit is cropped to the mask's box, between the first and the
last white pixel in raster order with the last row and column left out (its ``a[r0:r1, c0:c1]``
on those two pixels' coordinates; for the rectangular COCOEE masks, the box minus its last row
and column), and squashed to CLIP's input size (224 for ViT-B/32) by bilinear interpolation
without antialiasing (torchvision's tensor ``Resize`` of its day); the reference is squashed to
the same size by PIL's bicubic ``resize``. Both are CLIP-normalised, and the score is 100 x the
cosine of their ``encode_image`` features, averaged over the edits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pbe_lightning.images import PixelBox, to_pil
from pbe_lightning.metrics.features import ClipFeatures, unit


def scored_region(box: PixelBox) -> PixelBox:
    """The public tool's crop of a mask box ``(x0, y0, x1, y1)`` (end exclusive): its last
    row and column left out, one pixel kept at least."""
    x0, y0, x1, y1 = box
    return x0, y0, max(x1 - 1, x0 + 1), max(y1 - 1, y0 + 1)


def region_input(edit: torch.Tensor, box: PixelBox, clip: ClipFeatures) -> torch.Tensor:
    """``(1, 3, H, W)`` edit in [0, 1] -> its region as CLIP's normalised input ``(1, 3, S, S)``."""
    x0, y0, x1, y1 = scored_region(box)
    crop = edit.reshape(1, 3, *edit.shape[-2:])[..., y0:y1, x0:x1].float()
    size = (clip.image_size, clip.image_size)
    # Normalising before or after is the same: both are affine per channel.
    squashed = F.interpolate(crop, size, mode="bilinear", align_corners=False, antialias=False)
    return clip.normalise(squashed)


def reference_input(reference: torch.Tensor | Image.Image, clip: ClipFeatures) -> torch.Tensor:
    """The reference squashed to CLIP's input size by PIL's bicubic resize (its default)."""
    image = reference if isinstance(reference, Image.Image) else to_pil(reference)
    squashed = image.resize((clip.image_size, clip.image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(squashed.convert("RGB")).copy())
    return clip.normalise(pixels.permute(2, 0, 1)[None].float() / 255)


def region_clip_scores(
    edits: Sequence[torch.Tensor],
    mask_boxes: Sequence[PixelBox],
    references: Sequence[torch.Tensor | Image.Image],
    clip: ClipFeatures,
) -> list[float]:
    """100 x cosine(CLIP(edit's region), CLIP(reference)) for each edit."""
    if not len(edits):
        return []
    regions = torch.cat([region_input(e, b, clip) for e, b in zip(edits, mask_boxes, strict=True)])
    refs = torch.cat([reference_input(reference, clip) for reference in references])
    if len(refs) != len(regions):
        raise ValueError(f"{len(regions)} edits but {len(refs)} references")
    cosine = (unit(clip.encode(regions)) * unit(clip.encode(refs))).sum(1)
    return [float(value) * 100 for value in cosine.cpu()]
