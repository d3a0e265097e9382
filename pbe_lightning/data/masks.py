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

# Devices where picking the samples that draw the irregular shape costs nothing: the draw is
# already on the host. Elsewhere (accelerators) every polygon is filled and chosen per sample,
# which needs no host sync. Tests empty it to run the accelerator path on the CPU.
SUBSET_DEVICES = ("cpu",)


def pixel_centres(size: int, device: torch.device) -> torch.Tensor:
    """Normalised coordinates of pixel centres along one axis: ``(size,)``."""
    return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Rectangular holes: ``(B, 1, size, size)``, EDIT where the pixel centre is in the box."""
    return masks_from_holes(box_holes(boxes, size))


def box_holes(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, size, size)`` uint8, 1 where the pixel centre is in the box (the hole)."""
    centres = pixel_centres(size, boxes.device)
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    inside_x = ((centres >= x0) & (centres < x1)).to(torch.uint8)  # (B, W)
    inside_y = ((centres >= y0) & (centres < y1)).to(torch.uint8)  # (B, H)
    return inside_y[:, :, None] * inside_x[:, None, :]


def masks_from_holes(holes: torch.Tensor) -> torch.Tensor:
    """uint8 holes ``(B, H, W)`` (1 = hole) -> float masks ``(B, 1, H, W)``, KEEP=1 / EDIT=0.

    ``holes ^ 1`` is KEEP (1) outside and EDIT (0) inside; uint8 arithmetic is several times
    cheaper on the CPU than ``torch.where`` on booleans, and exact.
    """
    return (holes ^ 1).to(torch.float32)[:, None]


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
    """Fill closed polygons ``(B, N, 2)`` (even-odd rule): ``(B, 1, size, size)``."""
    return masks_from_holes(polygon_holes(polygons, size))


def polygon_holes(polygons: torch.Tensor, size: int) -> torch.Tensor:
    """Even-odd fill of closed polygons ``(B, N, 2)``: ``(B, size, size)`` uint8, 1 = inside.

    Scanline fill: a pixel is inside when an odd number of the polygon's edges cross its row
    to the left of its centre. Each crossing is turned into the first column whose centre lies
    strictly right of it (a search of ``B * size * N`` crossings among ``size`` sorted centres),
    counted into a per-row histogram, and a running sum along the row gives every pixel its
    number of crossings on the left. Same pixels as comparing each pixel with every crossing,
    but no ``B * size * size`` search and no sort; uint8 counts wrap at 256, which keeps the
    parity. Memory is ``B * size * N`` plus the ``B * size * size`` bytes of the result.
    """
    batch = polygons.shape[0]
    centres = pixel_centres(size, polygons.device)
    start = polygons
    end = torch.roll(polygons, shifts=-1, dims=1)
    sy, ey = start[..., 1][:, None, :], end[..., 1][:, None, :]  # (B, 1, N)
    sx, ex = start[..., 0][:, None, :], end[..., 0][:, None, :]
    rows = centres[None, :, None]  # (1, H, 1)
    crosses = (sy > rows) != (ey > rows)
    safe_dy = torch.where(ey == sy, torch.ones_like(ey), ey - sy)
    x_cross = sx + (rows - sy) * (ex - sx) / safe_dy  # (B, H, N)
    # Pixel j counts a crossing x when x < centre j: from column searchsorted(right=True) on.
    # Edges that miss the row go to the spare column ``size``, which is dropped.
    first = torch.searchsorted(centres, x_cross, right=True)
    first = first.masked_fill_(~crosses, size)
    counts = torch.zeros(batch, size, size + 1, dtype=torch.uint8, device=polygons.device)
    counts.scatter_add_(2, first, torch.ones_like(first, dtype=torch.uint8))
    return counts[..., :size].cumsum(-1, dtype=torch.uint8) & 1


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
        holes = box_holes(mask_boxes, size)
        if self.irregular_prob == 0:
            return masks_from_holes(holes)
        polygons = bezier_outline(
            object_boxes, mask_boxes, self.points_per_edge, self.jitter, generator
        )
        draw = torch.rand(object_boxes.shape[0], generator=generator, device=holes.device)
        use_irregular = draw < self.irregular_prob
        if holes.device.type in SUBSET_DEVICES:
            # The draw is on the host already: fill only the samples that drew the Bezier shape.
            index = use_irregular.nonzero().squeeze(1)
            if len(index) == len(holes):
                holes = polygon_holes(polygons, size)
            elif len(index):
                holes[index] = polygon_holes(polygons[index], size)
        else:
            # On an accelerator, selecting a subset would wait for the draw to reach the host;
            # filling every polygon and choosing per sample keeps the queue running.
            irregular = polygon_holes(polygons, size)
            holes = torch.where(use_irregular[:, None, None], irregular, holes)
        return masks_from_holes(holes)


def mask_from_user_image(white_is_edit: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """User mask file (``[0, 1]``, white = region to edit) -> model convention (KEEP = 1)."""
    return torch.where(white_is_edit > threshold, EDIT, KEEP)
