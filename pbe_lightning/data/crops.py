"""Crop-as-reference geometry: which box, where the hole goes, which part of the image to crop.

Pure arithmetic on pixel boxes ``(x0, y0, x1, y1)`` of the full image, so it is cheap in a
loader worker and easy to test. Pixels are only touched in ``pbe_lightning.data.samples``.

Two samplers (``CropSampler.mode``):

- ``original``: the public Paint-by-Example code's geometry, integer for integer. Boxes are
  whole pixels (truncated); each side of the box grows by ``randint(0, int(0.4 * free))`` px;
  the crop is the square of the image's short side at a ``randint`` position that keeps the
  grown box inside, then inset on all four sides by ``randint(0, int(0.6 * m))`` px (``m``:
  the smallest margin between the grown box and the square). A square image is used whole.
  When fewer than two square positions contain the grown box (the public code's test is
  ``right_most <= left_most``), the whole image is used and later squashed to a square.
- ``ours``: continuous fractions: the box grows by ``U(0, 0.4)`` of the free space (shrunk
  to fit the largest square), the square's side shrinks by ``U(0, 0.6)`` of its slack and
  its position is drawn again; a box no square can contain uses the whole image, squashed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

Box = tuple[float, float, float, float]
CROP_MODES = ("original", "ours")


@dataclass(frozen=True)
class BoxFilter:
    """Which annotated boxes can be the exemplar: area between ``min_area`` and ``max_area``
    of the image (paper: 2% and 80%), applied at read time so ablations can change it.

    ``require_square``: also refuse boxes longer than the image's short side, which no square
    crop contains (both samplers squash the whole image for those; this filter was ours).
    """

    min_area: float = 0.02
    max_area: float = 0.8
    require_square: bool = False

    def accepts(self, box: Box, width: int, height: int) -> bool:
        x0, y0, x1, y1 = box
        if not (x1 > x0 and y1 > y0):
            return False
        fraction = (x1 - x0) * (y1 - y0) / (width * height)
        fits = max(x1 - x0, y1 - y0) <= min(width, height) or not self.require_square
        return self.min_area <= fraction <= self.max_area and fits


@dataclass(frozen=True)
class CropGeometry:
    """Everything a training sample needs, in full-image pixels."""

    object_box: Box  # the annotated object, the exemplar's source
    mask_box: Box  # the object box enlarged: the rectangle the hole lives in
    crop: Box  # the crop (contains mask_box): square, or the whole image when squashed
    reference_box: Box  # object box padded a little, what the reference is cropped from

    @property
    def crop_size(self) -> tuple[float, float]:
        """Width and height of the crop in source pixels (equal unless it is squashed)."""
        cx0, cy0, cx1, cy1 = self.crop
        return cx1 - cx0, cy1 - cy0

    def in_crop(self, box: Box) -> Box:
        """``box`` in coordinates normalised to the crop, ``[0, 1]`` along each axis."""
        cx0, cy0, _, _ = self.crop
        width, height = self.crop_size
        x0, y0, x1, y1 = box
        return ((x0 - cx0) / width, (y0 - cy0) / height, (x1 - cx0) / width, (y1 - cy0) / height)


@dataclass(frozen=True)
class CropSampler:
    """Draws the geometry of one crop-as-reference sample (``mode``: see the module doc).

    ``max_enlarge``: each side of the box grows by up to this fraction of the free space on
    that side (0.4). ``max_inset``: the crop shrinks by up to this fraction of the margin
    around the grown box (0.6). ``reference_pad``: pixels added around the box for the
    reference crop (10).
    """

    mode: str = "original"
    max_enlarge: float = 0.4
    max_inset: float = 0.6
    reference_pad: int = 10

    def __post_init__(self) -> None:
        if self.mode not in CROP_MODES:
            raise ValueError(
                f"data.crop.mode={self.mode!r} is unknown: use original (the public code's "
                "integer geometry) or ours (continuous fractions)"
            )

    def __call__(self, box: Box, width: int, height: int, rng: random.Random) -> CropGeometry:
        if self.mode == "original":
            box = tuple(float(int(v)) for v in box)  # whole pixels, as the public code's boxes
            mask_box = self._grow_by_whole_pixels(box, width, height, rng)
            crop = self._original_crop(mask_box, width, height, rng)
        else:
            mask_box = self._grow_by_fractions(box, width, height, rng)
            crop = self._our_crop(mask_box, width, height, rng)
        x0, y0, x1, y1 = box
        pad = self.reference_pad
        reference_box = (
            max(0.0, x0 - pad),
            max(0.0, y0 - pad),
            min(float(width), x1 + pad),
            min(float(height), y1 + pad),
        )
        return CropGeometry(box, mask_box, crop, reference_box)

    # -- the public code's geometry ---------------------------------------------------------
    def _grow_by_whole_pixels(self, box: Box, width: int, height: int, rng: random.Random) -> Box:
        x0, y0, x1, y1 = box
        free = (x0, y0, width - x1, height - y1)  # left, top, right, bottom: its draw order
        left, top, right, bottom = (rng.randint(0, int(self.max_enlarge * f)) for f in free)
        return (x0 - left, y0 - top, x1 + right, y1 + bottom)

    def _original_crop(self, mask_box: Box, width: int, height: int, rng: random.Random) -> Box:
        if width == height:
            return (0.0, 0.0, float(width), float(height))
        if width > height:
            return self._slide_square(mask_box, width, height, rng)
        # Portrait: the same draws along y; transpose in, transpose the crop back.
        x0, y0, x1, y1 = mask_box
        cy0, cx0, cy1, cx1 = self._slide_square((y0, x0, y1, x1), height, width, rng)
        return (cx0, cy0, cx1, cy1)

    def _slide_square(self, mask_box: Box, long: int, short: int, rng: random.Random) -> Box:
        """Landscape (``long`` along x): the short-side square slid along x, then inset."""
        x0, y0, x1, y1 = (int(v) for v in mask_box)
        first = max(x1 - short, 0)
        last = min(x0 + short, long) - short
        if last <= first:  # the public code squashes unless two or more positions fit
            return (0.0, 0.0, float(long), float(short))
        left = rng.randint(first, last)
        margin = min(y0, x0 - left, left + short - x1, short - y1)
        inset = rng.randint(0, int(self.max_inset * margin))
        return (
            float(left + inset),
            float(inset),
            float(left + short - inset),
            float(short - inset),
        )

    # -- ours ---------------------------------------------------------------------------------
    def _grow_by_fractions(self, box: Box, width: int, height: int, rng: random.Random) -> Box:
        x0, y0, x1, y1 = box
        grow = [rng.uniform(0, self.max_enlarge) for _ in range(4)]
        x0n, x1n = x0 - grow[0] * x0, x1 + grow[2] * (width - x1)
        y0n, y1n = y0 - grow[1] * y0, y1 + grow[3] * (height - y1)
        short_side = min(width, height)
        if max(x1 - x0, y1 - y0) > short_side:
            return (x0n, y0n, x1n, y1n)  # no square holds the box: the image is squashed
        # The enlarged box must still fit the largest square crop; shrink the growth evenly.
        x0n, x1n = _fit_span(x0, x1, x0n, x1n, short_side)
        y0n, y1n = _fit_span(y0, y1, y0n, y1n, short_side)
        return (x0n, y0n, x1n, y1n)

    def _our_crop(self, mask_box: Box, width: int, height: int, rng: random.Random) -> Box:
        x0, y0, x1, y1 = mask_box
        short_side = min(width, height)
        needed = max(x1 - x0, y1 - y0)
        if needed > short_side:
            return (0.0, 0.0, float(width), float(height))
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

