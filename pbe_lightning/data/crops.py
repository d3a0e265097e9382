"""Crop-as-reference geometry (METHOD.md): which box, where the hole goes, which square to crop.

Pure arithmetic on pixel boxes ``(x0, y0, x1, y1)`` of the full image, so it is cheap in a
loader worker and easy to test. Pixels are only touched in ``pbe_lightning.data.samples``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class BoxFilter:
    """Which annotated boxes can be the exemplar: area between ``min_area`` and ``max_area``
    of the image (paper: 2% and 80%), applied at read time so ablations can change it."""

    min_area: float = 0.02
    max_area: float = 0.8

    def accepts(self, box: Box, width: int, height: int) -> bool:
        x0, y0, x1, y1 = box
        if not (x1 > x0 and y1 > y0):
            return False
        fraction = (x1 - x0) * (y1 - y0) / (width * height)
        # A square crop must contain the box, so a box longer than the short side cannot work.
        fits = max(x1 - x0, y1 - y0) <= min(width, height)
        return self.min_area <= fraction <= self.max_area and fits


@dataclass(frozen=True)
class CropGeometry:
    """Everything a training sample needs, in full-image pixels."""

    object_box: Box  # the annotated object, the exemplar's source
    mask_box: Box  # the object box enlarged: the rectangle the hole lives in
    crop: Box  # the square crop (contains mask_box)
    reference_box: Box  # object box padded a little, what the reference is cropped from

    def in_crop(self, box: Box) -> Box:
        """``box`` in coordinates normalised to the square crop, ``[0, 1]``."""
        cx0, cy0, cx1, _ = self.crop
        side = cx1 - cx0
        x0, y0, x1, y1 = box
        return ((x0 - cx0) / side, (y0 - cy0) / side, (x1 - cx0) / side, (y1 - cy0) / side)


@dataclass(frozen=True)
class CropSampler:
    """Draws the geometry of one crop-as-reference sample.

    ``max_enlarge``: each side of the box grows by up to this fraction of the free space on
    that side (paper 0.4). ``max_inset``: the square crop shrinks from the largest square
    by up to this fraction of the margin around the mask box (paper 0.6).
    ``reference_pad``: pixels added around the box for the reference crop (paper ~10).
    """

    max_enlarge: float = 0.4
    max_inset: float = 0.6
    reference_pad: int = 10

    def __call__(self, box: Box, width: int, height: int, rng: random.Random) -> CropGeometry:
        short_side = min(width, height)
        mask_box = self._enlarge(box, width, height, short_side, rng)
        crop = self._square_crop(mask_box, width, height, short_side, rng)
        x0, y0, x1, y1 = box
        pad = self.reference_pad
        reference_box = (
            max(0.0, x0 - pad),
            max(0.0, y0 - pad),
            min(float(width), x1 + pad),
            min(float(height), y1 + pad),
        )
        return CropGeometry(box, mask_box, crop, reference_box)

    def _enlarge(
        self, box: Box, width: int, height: int, short_side: int, rng: random.Random
    ) -> Box:
        x0, y0, x1, y1 = box
        grow = [rng.uniform(0, self.max_enlarge) for _ in range(4)]
        x0n, x1n = x0 - grow[0] * x0, x1 + grow[2] * (width - x1)
        y0n, y1n = y0 - grow[1] * y0, y1 + grow[3] * (height - y1)
        # The enlarged box must still fit the largest square crop; shrink the growth evenly.
        x0n, x1n = _fit_span(x0, x1, x0n, x1n, short_side)
        y0n, y1n = _fit_span(y0, y1, y0n, y1n, short_side)
        return (x0n, y0n, x1n, y1n)

    def _square_crop(
        self, mask_box: Box, width: int, height: int, short_side: int, rng: random.Random
    ) -> Box:
        x0, y0, x1, y1 = mask_box
        needed = max(x1 - x0, y1 - y0)
        side = short_side - rng.uniform(0, self.max_inset) * (short_side - needed)
        side = max(needed, min(float(short_side), side))
        left = rng.uniform(max(0.0, x1 - side), min(x0, width - side))
        top = rng.uniform(max(0.0, y1 - side), min(y0, height - side))
        return (left, top, left + side, top + side)


def _fit_span(
    lo: float, hi: float, lo_new: float, hi_new: float, limit: float
) -> tuple[float, float]:
    span = hi_new - lo_new
    if span <= limit:
        return lo_new, hi_new
    keep = (limit - (hi - lo)) / max(span - (hi - lo), 1e-9)
    return lo - (lo - lo_new) * keep, hi + (hi_new - hi) * keep


def choose_box(
    boxes: list[Box], width: int, height: int, box_filter: BoxFilter, rng: random.Random
) -> Box | None:
    """One valid box at random, or None when the image has none."""
    valid = [b for b in boxes if box_filter.accepts(b, width, height)]
    return rng.choice(valid) if valid else None


def is_finite_box(box: object) -> bool:
    return (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        and all(math.isfinite(v) for v in box)
    )
