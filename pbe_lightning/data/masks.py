"""Inpainting masks drawn from boxes, batched on whatever device the batch lives on.

Convention, used everywhere in tensors the model sees: ``KEEP = 1`` (pixel is context),
``EDIT = 0`` (pixel is the hole to paint). Mask *files* from users are the other way round
(white = edit); convert them with :func:`mask_from_user_image`.

Boxes are ``(B, 4)`` tensors ``x0, y0, x1, y1`` normalised to ``[0, 1]`` of the square crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEEP = 1.0
EDIT = 0.0


def pixel_centres(size: int, device: torch.device) -> torch.Tensor:
    """Normalised coordinates of pixel centres along one axis: ``(size,)``."""
    return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Rectangular holes: ``(B, 1, size, size)``, EDIT where the pixel centre is in the box."""
    centres = pixel_centres(size, boxes.device)
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    inside_x = (centres >= x0) & (centres < x1)  # (B, W)
    inside_y = (centres >= y0) & (centres < y1)  # (B, H)
    hole = inside_y[:, :, None] & inside_x[:, None, :]
    return torch.where(hole, EDIT, KEEP)[:, None]


def bezier_outline(
    object_boxes: torch.Tensor,
    mask_boxes: torch.Tensor,
    points_per_edge: int,
    jitter: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Closed polygon ``(B, 4 * points_per_edge, 2)`` around each object box.

    Each edge of the object box becomes a quadratic Bezier curve from corner to corner whose
    middle control point sits on the matching edge of the enlarged mask box, so the shape
    bulges outwards, always covers the object and (Bezier curves stay in the hull of their
    control points) never leaves the mask box. Points are then jittered by up to ``jitter``
    (fraction of the crop) and clamped to the mask box, which keeps that guarantee.
    """
    x0, y0, x1, y1 = object_boxes.unbind(-1)
    ex0, ey0, ex1, ey1 = mask_boxes.unbind(-1)
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    # Clockwise: top, right, bottom, left; each edge as (start, control, end).
    edges = [
        ((x0, y0), (xm, ey0), (x1, y0)),
        ((x1, y0), (ex1, ym), (x1, y1)),
        ((x1, y1), (xm, ey1), (x0, y1)),
        ((x0, y1), (ex0, ym), (x0, y0)),
    ]
    t = torch.linspace(0, 1, points_per_edge + 1, device=object_boxes.device)[:-1]
    t = t[None, :]
    curves = []
    for (sx, sy), (cx, cy), (ex, ey) in edges:
        px = (1 - t) ** 2 * sx[:, None] + 2 * (1 - t) * t * cx[:, None] + t**2 * ex[:, None]
        py = (1 - t) ** 2 * sy[:, None] + 2 * (1 - t) * t * cy[:, None] + t**2 * ey[:, None]
        curves.append(torch.stack([px, py], dim=-1))
    polygon = torch.cat(curves, dim=1)
    noise = torch.rand(polygon.shape, generator=generator, device=polygon.device)
    polygon = polygon + (noise * 2 - 1) * jitter
    low = torch.stack([ex0, ey0], dim=-1)[:, None]
    high = torch.stack([ex1, ey1], dim=-1)[:, None]
    return torch.maximum(torch.minimum(polygon, high), low)


def polygon_masks(polygons: torch.Tensor, size: int) -> torch.Tensor:
    """Fill closed polygons ``(B, N, 2)`` (even-odd rule): ``(B, 1, size, size)``.

    Scanline fill: for every pixel row, the x positions where polygon edges cross it are sorted
    and a pixel is inside when an odd number of crossings lie to its left. Memory is
    ``B * size * N`` rather than ``B * size * size * N``, which keeps 512 px batches cheap.
    """
    centres = pixel_centres(size, polygons.device)
    start = polygons
    end = torch.roll(polygons, shifts=-1, dims=1)
    sy, ey = start[..., 1][:, None, :], end[..., 1][:, None, :]  # (B, 1, N)
    sx, ex = start[..., 0][:, None, :], end[..., 0][:, None, :]
    rows = centres[None, :, None]  # (1, H, 1)
    crosses = (sy > rows) != (ey > rows)
    safe_dy = torch.where(ey == sy, torch.ones_like(ey), ey - sy)
    x_cross = sx + (rows - sy) * (ex - sx) / safe_dy
    x_cross = torch.where(crosses, x_cross, torch.full_like(x_cross, float("inf")))
    x_cross, _ = torch.sort(x_cross, dim=-1)  # (B, H, N)
    columns = centres[None, None, :].expand(polygons.shape[0], size, size).contiguous()
    left_crossings = torch.searchsorted(x_cross.contiguous(), columns)
    hole = left_crossings % 2 == 1
    return torch.where(hole, EDIT, KEEP)[:, None]


@dataclass
class MaskGenerator:
    """Draws one hole per sample from its object and enlarged boxes.

    ``irregular_prob`` is the chance a sample gets the Bezier shape instead of the rectangle:
    0.5 in the paper, 0 for ``data/mask=box``, 1 for ``data/mask=irregular``.
    """

    irregular_prob: float = 0.5
    points_per_edge: int = 18
    jitter: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.irregular_prob <= 1.0:
            raise ValueError(
                f"data.mask.irregular_prob={self.irregular_prob} is not a probability: "
                "use a value in [0, 1] (0 = box masks, 1 = irregular masks)"
            )

    def __call__(
        self,
        object_boxes: torch.Tensor,
        mask_boxes: torch.Tensor,
        size: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        rect = box_masks(mask_boxes, size)
        if self.irregular_prob == 0:
            return rect
        polygons = bezier_outline(
            object_boxes, mask_boxes, self.points_per_edge, self.jitter, generator
        )
        irregular = polygon_masks(polygons, size)
        draw = torch.rand(object_boxes.shape[0], generator=generator, device=rect.device)
        use_irregular = (draw < self.irregular_prob)[:, None, None, None]
        return torch.where(use_irregular, irregular, rect)


def mask_from_user_image(white_is_edit: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """User mask file (``[0, 1]``, white = region to edit) -> model convention (KEEP = 1)."""
    return torch.where(white_is_edit > threshold, EDIT, KEEP)
