"""Filling holes (rectangles, polygons) into pixel grids, batched on the batch's device.

Two ways, chosen by ``MaskGenerator.edge``:

- hard (``box_holes``, ``polygon_holes``): 1 where the output pixel's centre is in the hole,
  in coordinates normalised to the crop.
- soft (``soft_box_holes``, ``soft_polygon_holes``): what the public Paint-by-Example code
  gets. It draws the hole at the source image's resolution (a numpy slice for the rectangle,
  ``PIL.ImageDraw.polygon`` for the polygon), crops it, and resizes the crop with torch's
  bilinear filter without antialiasing (torchvision ``Resize`` on a tensor), which gives the
  hole's edge fractional values. Here the hole is tested at exactly the source pixels that
  resize reads (two per axis for each output pixel) and mixed with its weights, so no
  source-resolution image is ever made: coordinates are in source pixels of the crop.

torch's ``interpolate`` cannot do this itself: it would need the source-resolution mask,
whose size differs per sample (a batch would need one resize per sample).
"""

from __future__ import annotations

import torch

# Room for float error when a vertex computed in float lands just below a whole pixel that
# the public code's float64 arithmetic reaches exactly (its vertices are truncated to ints).
WHOLE_PIXEL_TOLERANCE = 1e-4


def pixel_centres(size: int, device: torch.device) -> torch.Tensor:
    """Normalised coordinates of pixel centres along one axis: ``(size,)``."""
    return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size


def box_holes(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, size, size)`` uint8, 1 where the pixel centre is in the box (the hole)."""
    centres = pixel_centres(size, boxes.device)
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    inside_x = ((centres >= x0) & (centres < x1)).to(torch.uint8)  # (B, W)
    inside_y = ((centres >= y0) & (centres < y1)).to(torch.uint8)  # (B, H)
    return inside_y[:, :, None] * inside_x[:, None, :]


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


# -- soft: the public code's source-resolution hole, bilinearly resized -----------------------
def resize_taps(length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The source pixels and weights of torch's bilinear resize (``align_corners=False``, no
    antialiasing) from ``length`` (``(B,)``, whole pixels) to ``size`` pixels along one axis.

    Returns ``first``, ``second`` (``(B, size)`` pixel indices, as floats) and the weight of
    ``second``: output ``j`` reads the source at ``(j + 0.5) * length / size - 0.5``, clamped
    at 0, between the pixel below and the next one (the last pixel repeats at the edge).
    """
    scale = (length / size)[:, None]
    outputs = torch.arange(size, device=length.device, dtype=length.dtype)
    source = ((outputs + 0.5) * scale - 0.5).clamp_(min=0)
    first = source.floor()
    second = torch.minimum(first + 1, length[:, None] - 1)
    return first, second, source - first


def soft_box_holes(boxes: torch.Tensor, crop_px: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, size, size)`` float hole of rectangles ``(B, 4)`` in source pixels of the crop
    (``crop_px``: its ``(B, 2)`` width and height), as the public code's resized slice mask.

    The slice ``[y0:y1, x0:x1]`` holds the pixels whose centres lie in the box; the bilinear
    mix of two rectangles' rows and columns is the product of their mixes along each axis.
    """
    axes = []
    for axis in (0, 1):
        first, second, weight = resize_taps(crop_px[:, axis], size)
        low, high = boxes[:, axis, None], boxes[:, axis + 2, None]
        inside = [((p + 0.5 >= low) & (p + 0.5 < high)).to(weight.dtype) for p in (first, second)]
        axes.append(inside[0] * (1 - weight) + inside[1] * weight)
    across, down = axes
    return (down[:, :, None] * across[:, None, :]).float()


def soft_polygon_holes(
    vertices: torch.Tensor, crop_px: torch.Tensor, size: int, compact: bool = False
) -> torch.Tensor:
    """``(B, size, size)`` float hole of closed polygons ``(B, N, 2)`` in source pixels of the
    crop, as the public code's ``ImageDraw.polygon`` mask after its bilinear resize.
    ``compact``: see ``pil_fill`` (for a host device)."""
    # PIL truncates vertices to whole pixels and works in float32 from there on.
    vertices = (vertices + WHOLE_PIXEL_TOLERANCE).floor().float()
    first_x, second_x, weight_x = resize_taps(crop_px[:, 0], size)
    first_y, second_y, weight_y = resize_taps(crop_px[:, 1], size)
    rows = torch.cat([first_y, second_y], dim=1).float()  # (B, 2 * size)
    # Both column sets at once: sorted together, then taken apart again.
    columns, order = torch.cat([first_x, second_x], dim=1).float().sort(dim=-1)
    place = torch.empty_like(order).scatter_(1, order, torch.arange(2 * size).expand_as(order))
    inside = pil_fill(vertices, rows, columns, compact)  # (B, 2 * size, 2 * size)
    inside = inside.gather(2, place[:, None, :].expand(-1, 2 * size, -1)).float()
    left, right = inside[..., :size], inside[..., size:]
    weight_x = weight_x[:, None, :].float()
    mixed = left * (1 - weight_x) + right * weight_x  # every row, mixed across
    upper, lower = mixed[:, :size], mixed[:, size:]
    weight_y = weight_y[:, :, None].float()
    return upper * (1 - weight_y) + lower * weight_y


def pil_fill(
    vertices: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, compact: bool = False
) -> torch.Tensor:
    """What ``PIL.ImageDraw.polygon`` fills: ``(B, R, C)`` bool at whole-pixel ``rows``
    ``(B, R)`` and sorted whole-pixel ``columns`` ``(B, C)`` of whole-pixel ``vertices``.

    PIL's scanline fill (``polygon_generic`` in its Draw.c) fills pixel ``x`` of a row when
    ``low - 0.5 < x < high + 0.5`` for one of the row's spans: each span reaches the pixels
    its ends round to. The spans: consecutive pairs of the row's sorted edge crossings
    (half-open in y, in PIL's float32 arithmetic), every horizontal edge on the row, and the
    lowest point of every edge ending on the row (PIL counts an edge's last row twice, which
    fills the bottom corners). Measured against Pillow 9.5 and 13 on jittered Bezier outlines:
    the same pixels but for a few in 100,000 (Pillow 10+ also bends some corners).

    A row has up to ``1.5 N`` spans, most of them unused; ``compact`` (for a device where
    reading a count costs no sync, i.e. the host) drops the columns no row uses first.
    """
    start = vertices[:, None, :, :]  # (B, 1, N, 2)
    end = torch.roll(vertices, shifts=-1, dims=1)[:, None, :, :]
    sx, sy, ex, ey = start[..., 0], start[..., 1], end[..., 0], end[..., 1]
    y = rows[:, :, None]  # (B, R, 1)
    inf = torch.tensor(float("inf"), device=vertices.device)
    flat = ey == sy
    slope = (ex - sx) / torch.where(flat, torch.ones_like(ey), ey - sy)
    # Whole-pixel rows and vertices: every row crosses an even number of edges, so the sorted
    # crossings pair up, unused ones (inf) last.
    crossings = torch.where((sy > y) != (ey > y), (y - sy) * slope + sx, inf)
    crossings = crossings.sort(dim=-1).values
    if crossings.shape[-1] % 2:
        crossings = torch.cat([crossings, inf.expand_as(crossings[..., :1])], dim=-1)
    pair_low, pair_high = crossings[..., 0::2], crossings[..., 1::2]
    # One more span per edge, on its last row: the edge itself if it is horizontal, else its
    # lowest point.
    last_row = torch.maximum(sy, ey)
    lowest = torch.where(ey > sy, ex, sx)
    edge_low = torch.where(flat, torch.minimum(sx, ex), lowest)
    edge_high = torch.where(flat, torch.maximum(sx, ex), lowest)
    on_row = last_row == y  # (B, R, N)
    if compact:
        pairs = max(columns_in_use(torch.isfinite(pair_high)), 1)  # used pairs come first
        pair_low, pair_high = pair_low[..., :pairs], pair_high[..., :pairs]
        in_use = on_row.sum(-1, keepdim=True) > torch.arange(on_row.shape[-1], device=y.device)
        extras = max(columns_in_use(in_use), 1)
        on_row, order = on_row.to(torch.uint8).topk(extras, dim=-1)  # the row's edges first
        on_row = on_row.bool()
        edge_low = edge_low.expand(-1, rows.shape[1], -1).gather(-1, order)
        edge_high = edge_high.expand(-1, rows.shape[1], -1).gather(-1, order)
    low = torch.cat([pair_low, torch.where(on_row, edge_low, inf)], dim=-1)
    high = torch.cat([pair_high, torch.where(on_row, edge_high, inf)], dim=-1)
    counts = span_counts(low, high, columns)
    return counts[..., :-1].cumsum(-1, dtype=torch.uint8) > 0


def columns_in_use(used: torch.Tensor) -> int:
    """How many of the last dimension's leading entries some row uses (``used`` packed first).
    Read from a shape, not a value: this is host-side bookkeeping (``compact``)."""
    return used.flatten(0, -2).any(0).nonzero().shape[0]


def span_counts(low: torch.Tensor, high: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``(B, R, C + 1)`` uint8: +1 at the first column of each span ``low - 0.5 < x <
    high + 0.5`` (``(B, R, K)``), -1 (255: counts wrap at 256) after its last; unused spans
    (inf) land in the spare last column. A running sum along the row then counts the spans
    over each column, exactly while fewer than 256 overlap (a row has at most N + N / 2)."""
    batch, rows, spans = low.shape
    first = torch.searchsorted(columns, (low - 0.5).view(batch, -1), right=True)
    after = torch.searchsorted(columns, (high + 0.5).view(batch, -1), right=False)
    counts = torch.zeros(batch, rows, columns.shape[-1] + 1, dtype=torch.uint8, device=low.device)
    ones = torch.ones(1, dtype=torch.uint8, device=low.device).expand(batch, rows, spans)
    counts.scatter_add_(2, first.view(batch, rows, spans), ones)
    counts.scatter_add_(2, after.view(batch, rows, spans), ones * 255)
    return counts
