"""Crop and resize a region of a decoded image as PIL's box-filtered bilinear resize does,
with torch's antialiased uint8 kernel where it can place its sampling grid on PIL's.

Why not PIL's ``resize(box=...)`` alone: torch's AVX2 uint8 kernel is 3-8x faster here, which
is most of a loader worker's time per sample. It only samples from a whole-pixel start, so
``axis_plan`` finds a start within ``ALIGN_TOLERANCE`` of PIL's grid; where none exists PIL's
exact resize does the crop.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from pbe_lightning.data.crops import Box

# How far the kernel's grid may sit from the box's, in input pixels (output pixels when
# enlarging), and how many extra leading output pixels it may compute to get there; past
# either, PIL's exact box resize does the crop.
ALIGN_TOLERANCE = 0.02
MAX_LEAD = 256
# A (C, H, W) tensor in the stored orientation -> as displayed (DISPLAY_TRANSPOSE's, in torch).
DISPLAY_TENSOR = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, dims=(-2, -1)),
    7: lambda x: torch.rot90(x, 2, dims=(-2, -1)).transpose(-2, -1),
    8: lambda x: torch.rot90(x, 1, dims=(-2, -1)),
}


def crop_resize(image: Image.Image, box: tuple[float, ...], size: int, turn: int) -> torch.Tensor:
    """``box`` (stored-orientation pixels, fractional) of RGB ``image`` resized to ``size`` with
    PIL's bilinear box filter, shown as the EXIF ``turn`` says: (3, size, size) uint8."""
    # Float rounding in the scale factor can put an edge a hair past the image; PIL refuses it.
    x0, y0, x1, y1 = box
    box = (max(x0, 0.0), max(y0, 0.0), min(x1, image.width), min(y1, image.height))
    out = torch_crop_resize(image, box, size)
    if out is None:
        region = image.resize((size, size), Image.BILINEAR, box=box, reducing_gap=None)
        out = torch.from_numpy(np.array(region)).permute(2, 0, 1)
    return DISPLAY_TENSOR[turn](out) if turn in DISPLAY_TENSOR else out


def torch_crop_resize(image: Image.Image, box: Box, size: int) -> torch.Tensor | None:
    """PIL's ``resize(box=box)`` with torch's kernel, or None where it cannot place its grid
    within ALIGN_TOLERANCE of PIL's (contiguous (3, size, size) uint8)."""
    across = axis_plan(box[0], box[2], size, image.width)
    down = axis_plan(box[1], box[3], size, image.height)
    if across is None or down is None:
        return None
    (left, right, lead_x, scale_x), (top, bottom, lead_y, scale_y) = across, down
    region = rgbx_region(image, top, bottom, left, right)
    if region is None:
        return None
    out = torch.ops.aten._upsample_bilinear2d_aa(
        region, [lead_y + size, lead_x + size], False, 1 / scale_y, 1 / scale_x
    )
    return out[0, :3, lead_y:, lead_x:].contiguous()


def axis_plan(
    start: float, end: float, size: int, length: int
) -> tuple[int, int, int, float] | None:
    """Where torch's kernel must read along one axis to sample ``[start, end)`` of ``length``
    pixels onto ``size`` pixels as PIL's box resize does: ``(first, last, lead, scale)``.

    Both place output ``i``'s triangle filter (radius ``max(scale, 1)`` input pixels) at
    ``start + scale * (i + 0.5)``, but torch counts from the first pixel it is given, a whole
    one. So it is given pixels from ``first = start - scale * lead`` on, an integer within
    ALIGN_TOLERANCE for some ``lead``, and its first ``lead`` outputs are dropped. ``first``
    may be negative: edge pixels repeat there (only outputs whose filter crosses the image
    edge see them; PIL instead reweights the pixels inside). None where no lead up to
    MAX_LEAD works, e.g. a scale of a simple fraction and an unlucky start.
    """
    scale = (end - start) / size
    radius = max(scale, 1.0)
    tolerance = ALIGN_TOLERANCE * min(scale, 1.0)
    # PIL's first tap for output 0 (0 if the filter crosses the edge), and its last for the
    # last output, plus one pixel: the kernel's grid sits up to ``tolerance`` off PIL's.
    first_tap = max(math.floor(start + 0.5 * scale - radius + 0.5), 0)
    last = min(length, math.floor(end - 0.5 * scale + radius + 0.5) + 1)
    for lead in range(MAX_LEAD + 1):
        origin = start - scale * lead
        first = round(origin)
        if abs(origin - first) <= tolerance and (first < first_tap or first == first_tap == 0):
            return first, last, lead, scale
    return None


def rgbx_region(
    image: Image.Image, top: int, bottom: int, left: int, right: int
) -> torch.Tensor | None:
    """Rows ``top:bottom`` and columns ``left:right`` of RGB ``image`` as a contiguous
    (1, 4, h, w) channels-last uint8 tensor (RGB and a spare byte: what the kernel reads
    without another copy); rows and columns before the image repeat its edge.

    One copy, by PIL's paste into an RGBX image that ``frombuffer`` maps onto the array's
    memory: PIL keeps RGB as 4 bytes a pixel, so rows are copied as they are, where
    ``np.asarray`` packs the whole image to 3 bytes a pixel and joins chunks (~1 ms a
    megapixel). The core ``paste`` is called because ``Image.paste`` would copy a mapped
    (read-only) image first; it copies the part of the image inside the region. None if PIL
    did not map the array (it marks mapped images read-only), so nothing would land there.
    """
    pixels = np.empty((bottom - top, right - left, 4), np.uint8)
    target = Image.frombuffer("RGBX", (right - left, bottom - top), pixels, "raw", "RGBX", 0, 1)
    if not target.readonly:
        return None
    target.im.paste(image.im, (-left, -top, image.width - left, image.height - top))
    pad_top, pad_left = max(-top, 0), max(-left, 0)
    pixels[:pad_top, pad_left:] = pixels[pad_top, pad_left:]
    pixels[:, :pad_left] = pixels[:, pad_left : pad_left + 1]
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]
