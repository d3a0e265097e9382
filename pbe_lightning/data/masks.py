"""Inpainting masks drawn from boxes, batched on whatever device the batch lives on.

Convention, used everywhere in tensors the model sees: ``KEEP = 1`` (pixel is context),
``EDIT = 0`` (pixel is the hole to paint). Mask *files* from users are the other way round
(white = edit); convert them with :func:`mask_from_user_image`. A soft mask (``edge=soft``)
has values between the two on the hole's border; ``masked_image = image * mask`` then fades
the border, as the public Paint-by-Example code's masked image does.

Boxes are ``(B, 4)`` tensors ``x0, y0, x1, y1`` normalised to ``[0, 1]`` of the crop along
each axis. What is measured in source pixels (the outline's jitter, the soft edge) uses each
sample's crop size in source pixels, ``crop_px`` ``(B, 2)`` (width, height), which the
loader puts in every sample; without it the output pixels stand in for source pixels.

The irregular hole (``outline``):

- ``original``: the public code's: 4 quadratic Bezier curves, each from one corner of the
  object box to the next with its middle control point on the enlarged box's edge, evaluated
  at ``t = 0.05, 0.10, ...`` (``points_per_edge`` of them: 18, up to ``t = 0.9``); each
  point moves by a random whole number of source pixels in ``[-jitter_px, jitter_px]`` along
  each axis; nothing clamps it. That code also skips a point whose x or y equals (in float64)
  one of an earlier point's of the same curve: ``outline_keep`` flags, worked out in the
  loader worker by :func:`outline_keep_flags`, say which points it kept.
- ``ours``: ``t = k / points_per_edge`` from 0, uniform jitter of up to ``jitter`` of the crop,
  points clamped to the enlarged box.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pbe_lightning.data.mask_raster import (
    box_holes,
    pixel_centres,
    polygon_holes,
    soft_box_holes,
    soft_polygon_holes,
)

__all__ = ["pixel_centres", "box_holes", "polygon_holes"]  # re-exported for callers

KEEP = 1.0
EDIT = 0.0
OUTLINES = ("original", "ours")
EDGES = ("soft", "hard")
# The public code's curve parameters: t = i * 0.05 for i = 1, 2, ...; 19 points stay below
# t = 1, so the loader works out the keep flags for 19 and a generator uses the first ones.
ORIGINAL_T_STEP = 0.05
MAX_ORIGINAL_POINTS = 19

# Devices where picking the samples that draw the irregular shape costs nothing: the draw is
# already on the host. Elsewhere (accelerators) every polygon is filled and chosen per sample,
# which needs no host sync. Tests empty it to run the accelerator path on the CPU.
SUBSET_DEVICES = ("cpu",)


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Rectangular holes: ``(B, 1, size, size)``, EDIT where the pixel centre is in the box."""
    return masks_from_holes(box_holes(boxes, size))


def polygon_masks(polygons: torch.Tensor, size: int) -> torch.Tensor:
    """Fill closed polygons ``(B, N, 2)`` (even-odd rule): ``(B, 1, size, size)``."""
    return masks_from_holes(polygon_holes(polygons, size))


def masks_from_holes(holes: torch.Tensor) -> torch.Tensor:
    """uint8 holes ``(B, H, W)`` (1 = hole) -> float masks ``(B, 1, H, W)``, KEEP=1 / EDIT=0.

    ``holes ^ 1`` is KEEP (1) outside and EDIT (0) inside; uint8 arithmetic is several times
    cheaper on the CPU than ``torch.where`` on booleans, and exact.
    """
    return (holes ^ 1).to(torch.float32)[:, None]


def curve_nodes(object_boxes: torch.Tensor, mask_boxes: torch.Tensor) -> list[tuple]:
    """The 4 quadratic Bezier curves around each object box, clockwise from the top:
    ``((start_x, start_y), (control_x, control_y), (end_x, end_y))`` of ``(B,)`` tensors or
    floats. Each runs corner to corner; its middle control point sits on the enlarged box."""
    x0, y0, x1, y1 = _corners(object_boxes)
    ex0, ey0, ex1, ey1 = _corners(mask_boxes)
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    return [
        ((x0, y0), (xm, ey0), (x1, y0)),
        ((x1, y0), (ex1, ym), (x1, y1)),
        ((x1, y1), (xm, ey1), (x0, y1)),
        ((x0, y1), (ex0, ym), (x0, y0)),
    ]


def _corners(box: torch.Tensor | tuple[float, ...]) -> tuple:
    return box.unbind(-1) if isinstance(box, torch.Tensor) else tuple(box)


def public_bezier(start, control, end, s):  # noqa: ANN001, ANN201 (floats or tensors)
    """A quadratic Bezier at ``s`` with the operations, in their order, of the ``bezier``
    package the public code evaluates with (its "VS" Horner scheme), so float64 gives its
    exact values: the public code compares them for equality."""
    rest = 1.0 - s
    value = rest * start
    value = (value + (2.0 * s) * control) * rest
    return value + (s * s) * end


def outline_keep_flags(
    object_box: tuple[float, ...], mask_box: tuple[float, ...], points: int = MAX_ORIGINAL_POINTS
) -> list[list[bool]]:
    """Which of the public code's Bezier points it keeps, ``[curve][point]`` (loader side).

    It keeps point ``i`` of a curve only when neither its x nor its y equals an x or a y of a
    point it kept before on that curve, compared in float64. Where the enlarged box does not
    grow a side, that curve is flat and most of its points go; elsewhere points past the
    middle often fall exactly on their mirror image and go too (measured: 1.7% of the hole's
    area on average). Boxes in source pixels, Python floats (float64) as that code used.
    """
    keep = []
    for start, control, end in curve_nodes(object_box, mask_box):
        seen_x, seen_y, flags = set(), set(), []
        for i in range(1, points + 1):
            s = i * ORIGINAL_T_STEP
            x = public_bezier(start[0], control[0], end[0], s)
            y = public_bezier(start[1], control[1], end[1], s)
            flags.append(x not in seen_x and y not in seen_y)
            if flags[-1]:
                seen_x.add(x)
                seen_y.add(y)
        keep.append(flags)
    return keep


def bezier_outline(
    object_boxes: torch.Tensor,
    mask_boxes: torch.Tensor,
    points_per_edge: int,
    jitter: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Our closed polygon ``(B, 4 * points_per_edge, 2)`` around each object box, normalised.

    Curves from ``curve_nodes`` at ``t = k / points_per_edge``, so the shape bulges outwards,
    always covers the object and (Bezier curves stay in the hull of their control points)
    never leaves the mask box. Points are then jittered by up to ``jitter`` (fraction of the
    crop) and clamped to the mask box, which keeps that guarantee.
    """
    t = torch.linspace(0, 1, points_per_edge + 1, device=object_boxes.device)[:-1][None, :]
    curves = []
    for (sx, sy), (cx, cy), (ex, ey) in curve_nodes(object_boxes, mask_boxes):
        px = (1 - t) ** 2 * sx[:, None] + 2 * (1 - t) * t * cx[:, None] + t**2 * ex[:, None]
        py = (1 - t) ** 2 * sy[:, None] + 2 * (1 - t) * t * cy[:, None] + t**2 * ey[:, None]
        curves.append(torch.stack([px, py], dim=-1))
    polygon = torch.cat(curves, dim=1)
    noise = torch.rand(polygon.shape, generator=generator, device=polygon.device)
    polygon = polygon + (noise * 2 - 1) * jitter
    low = mask_boxes[:, None, :2]
    high = mask_boxes[:, None, 2:]
    return torch.maximum(torch.minimum(polygon, high), low)


def original_outline(
    object_px: torch.Tensor,
    mask_px: torch.Tensor,
    points_per_edge: int,
    jitter_px: int,
    keep: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The public code's polygon ``(B, 4 * points_per_edge, 2)``, in source pixels.

    ``object_px``, ``mask_px``: boxes in source pixels of the crop; ``keep``: ``(B, 4, P)``
    bool, the points that code keeps (see :func:`outline_keep_flags`). A skipped point takes
    the place of the kept point before it: a zero-length edge, which fills nothing.
    """
    steps = torch.arange(1, points_per_edge + 1, device=object_px.device, dtype=object_px.dtype)
    t = (steps * ORIGINAL_T_STEP)[None, :]
    curves = []
    for start, control, end in curve_nodes(object_px, mask_px):
        axes = [
            public_bezier(start[a][:, None], control[a][:, None], end[a][:, None], t)
            for a in (0, 1)
        ]
        curves.append(torch.stack(axes, dim=-1))
    curves = torch.stack(curves, dim=1)  # (B, 4, P, 2)
    # randint(-jitter_px, jitter_px) px per axis, as the public code.
    shift = torch.randint(
        -jitter_px, jitter_px + 1, curves.shape, generator=generator, device=curves.device
    )
    curves = curves + shift.to(curves.dtype)
    positions = torch.arange(points_per_edge, device=keep.device)
    last_kept = (positions * keep[..., :points_per_edge]).cummax(dim=-1).values
    curves = curves.gather(2, last_kept[..., None].expand_as(curves))
    return curves.flatten(1, 2)


@dataclass
class MaskGenerator:
    """Draws one hole per sample from its object and enlarged boxes.

    ``irregular_prob`` is the chance a sample gets the Bezier shape instead of the rectangle:
    0.5 in the paper, 0 for ``data/mask=box``, 1 for ``data/mask=irregular``. ``outline``:
    ``original`` or ``ours`` (module doc). ``edge``: ``soft``, the public code's (the hole
    drawn at the source resolution and bilinearly resized: fractional values on its border),
    or ``hard`` (ours: 0 or 1 by the output pixel's centre).
    """

    irregular_prob: float = 0.5
    points_per_edge: int = 18
    outline: str = "original"
    jitter_px: int = 5  # outline=original: whole source pixels per axis
    jitter: float = 0.01  # outline=ours: fraction of the crop side
    edge: str = "soft"

    def __post_init__(self) -> None:
        if not 0.0 <= self.irregular_prob <= 1.0:
            raise ValueError(
                f"data.mask.irregular_prob={self.irregular_prob} is not a probability: "
                "use a value in [0, 1] (0 = box masks, 1 = irregular masks)"
            )
        if self.outline not in OUTLINES:
            raise ValueError(f"data.mask.outline={self.outline!r}: use original or ours")
        if self.edge not in EDGES:
            raise ValueError(f"data.mask.edge={self.edge!r}: use soft or hard")
        most = MAX_ORIGINAL_POINTS if self.outline == "original" else 10_000
        if not 1 <= self.points_per_edge <= most:
            raise ValueError(
                f"data.mask.points_per_edge={self.points_per_edge}: use 1 to {most} "
                "(outline=original steps t by 0.05 and stays below t = 1)"
            )
        if self.jitter_px < 0 or self.jitter_px != int(self.jitter_px):
            raise ValueError(f"data.mask.jitter_px={self.jitter_px}: use a whole number >= 0")

    def __call__(
        self,
        object_boxes: torch.Tensor,
        mask_boxes: torch.Tensor,
        size: int,
        generator: torch.Generator | None = None,
        crop_px: torch.Tensor | None = None,
        outline_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, 1, size, size)`` float masks. ``crop_px`` ``(B, 2)`` and ``outline_keep``
        ``(B, 4, >= points_per_edge)`` come with each sample from the loader (module doc)."""
        batch, device = object_boxes.shape[0], object_boxes.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        if crop_px is None:
            crop_px = torch.full((batch, 2), float(size), device=device)
        crop_px = crop_px.to(dtype)
        scale = crop_px.repeat(1, 2)  # (B, 4): x, y, x, y
        rectangles = self._rectangles(mask_boxes, scale, size)
        if self.irregular_prob == 0:
            return self._as_masks(rectangles)
        polygons = self._polygons(object_boxes, mask_boxes, scale, outline_keep, generator)
        draw = torch.rand(batch, generator=generator, device=device)
        use_irregular = draw < self.irregular_prob
        if device.type in SUBSET_DEVICES:
            # The draw is on the host already: fill only the samples that drew the Bezier shape.
            index = use_irregular.nonzero().squeeze(1)
            if len(index) == batch:
                rectangles = self._fill(polygons, crop_px, size)
            elif len(index):
                rectangles[index] = self._fill(polygons[index], crop_px[index], size)
            return self._as_masks(rectangles)
        # On an accelerator, selecting a subset would wait for the draw to reach the host;
        # filling every polygon and choosing per sample keeps the queue running.
        irregular = self._fill(polygons, crop_px, size)
        return self._as_masks(torch.where(use_irregular[:, None, None], irregular, rectangles))

    def _rectangles(self, mask_boxes: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
        if self.edge == "hard":
            return box_holes(mask_boxes, size)
        return soft_box_holes(mask_boxes.to(scale.dtype) * scale, scale[:, :2], size)

    def _polygons(
        self,
        object_boxes: torch.Tensor,
        mask_boxes: torch.Tensor,
        scale: torch.Tensor,
        outline_keep: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Outlines in source pixels of the crop for ``edge=soft``, else normalised."""
        if self.outline == "ours":
            polygons = bezier_outline(
                object_boxes, mask_boxes, self.points_per_edge, self.jitter, generator
            )
            return (
                polygons if self.edge == "hard" else polygons.to(scale.dtype) * scale[:, None, :2]
            )
        if outline_keep is None:
            outline_keep = torch.ones(
                len(object_boxes), 4, self.points_per_edge, dtype=torch.bool, device=scale.device
            )
        # The public code's boxes are whole source pixels: undo the normalisation's rounding.
        object_px = (object_boxes.to(scale.dtype) * scale).round()
        mask_px = (mask_boxes.to(scale.dtype) * scale).round()
        polygons = original_outline(
            object_px, mask_px, self.points_per_edge, self.jitter_px, outline_keep, generator
        )
        return polygons if self.edge == "soft" else (polygons / scale[:, None, :2]).float()

    def _fill(self, polygons: torch.Tensor, crop_px: torch.Tensor, size: int) -> torch.Tensor:
        if self.edge == "hard":
            return polygon_holes(polygons, size)
        return soft_polygon_holes(
            polygons, crop_px, size, compact=polygons.device.type in SUBSET_DEVICES
        )

    def _as_masks(self, holes: torch.Tensor) -> torch.Tensor:
        if self.edge == "hard":
            return masks_from_holes(holes)
        return (1.0 - holes)[:, None]


def mask_from_user_image(white_is_edit: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """User mask file (``[0, 1]``, white = region to edit) -> model convention (KEEP = 1)."""
    return torch.where(white_is_edit > threshold, EDIT, KEEP)
