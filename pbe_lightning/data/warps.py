"""Geometric warps of the reference augmentation, batched: sampling grids and one resampling.

Everything is in pixel-index coordinates, as OpenCV's ``warpAffine``/``remap`` use them: pixel
``(x, y)`` is column ``x``, row ``y``, the first pixel's centre is ``(0, 0)``, the last
``(W - 1, H - 1)``. A warp is an output-to-source map evaluated at every output pixel (a grid
``(m, 2, H, W)`` of source ``x, y``); :func:`sample` reads the image there, bilinear.

Borders: ``reflect101`` mirrors about the edge pixel (``...c b | a b c ... | x y | x w...``,
OpenCV's ``BORDER_REFLECT_101``); ``zeros`` reads black outside. ``grid_sample``'s own
``padding_mode="reflection"`` mirrors about the pixel *edge* (the edge pixel repeated,
OpenCV's ``BORDER_REFLECT``), so reflect-101 is done here by folding the source coordinates
into ``[0, n - 1]`` (:func:`fold_reflect101`) before sampling. Bilinear interpolation of the
mirrored image at ``x`` equals interpolation at the folded ``x``, since the mirrored sequence
is symmetric about each edge pixel's centre: the fold is exact, not an approximation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from kornia.geometry.transform import get_perspective_transform

BORDERS = ("reflect101", "zeros")
PERSPECTIVE_DISTORTION = 0.3  # each corner moves inwards by up to this much of half the side
GAUSSIAN_TRUNCATE = 4.0  # the displacement field's smoothing is cut at 4 sigma (scipy's default)
# Singular values of the smoothing kept, relative to the largest: the field's error is ~1e-4 of
# its size (at 224 px: ~3e-6 px; OpenCV itself rounds coordinates to 1/32 px).
SMOOTHING_RANK_TOLERANCE = 1e-4


def pixel_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """``(3, H*W)``: every pixel's ``(x, y, 1)``, row-major."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([xs.flatten(), ys.flatten(), torch.ones_like(xs.flatten())])


def rotation_maps(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(m,)`` angles -> ``(m, 3, 3)`` output-to-source maps of a rotation by that angle.

    OpenCV's ``getRotationMatrix2D((W / 2, H / 2), angle, 1)`` as ``warpAffine`` applies it:
    about the point ``(W / 2, H / 2)`` (half a pixel off the true centre, as there), positive =
    counter-clockwise on screen. The output-to-source map is the rotation by ``-angle``.
    """
    radians = degrees * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    cx, cy = width / 2, height / 2
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    rows = [
        torch.stack([cos, -sin, (1 - cos) * cx + sin * cy], -1),
        torch.stack([sin, cos, -sin * cx + (1 - cos) * cy], -1),
        torch.stack([zero, zero, one], -1),
    ]
    return torch.stack(rows, dim=1)


def perspective_maps(
    uniform: torch.Tensor, drawn: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """``(m, 4, 2)`` uniforms -> ``(m, 3, 3)`` output-to-source homographies, identity where not drawn.

    The corner pixels' centres (top-left, top-right, bottom-right, bottom-left) move inwards
    by ``uniform * PERSPECTIVE_DISTORTION`` of half the side.
    """
    # Corner signs built on the device (a host tensor would be a copy that waits on a GPU).
    corner = torch.arange(4, device=uniform.device)
    signs = torch.stack([(corner + 1) // 2 % 2, corner // 2], dim=-1).float() * 2 - 1
    size = torch.stack(
        [torch.full_like(signs[:, 0], width), torch.full_like(signs[:, 1], height)], -1
    )
    start = ((signs + 1) / 2 * (size - 1)).expand(len(uniform), 4, 2)  # corner pixel centres
    end = start - uniform * PERSPECTIVE_DISTORTION * signs * size / 2
    homography = get_perspective_transform(end, start)
    identity = torch.eye(3, device=uniform.device).expand_as(homography)
    return torch.where(drawn[:, None, None], homography, identity)


def control_points(height: int, width: int, device: torch.device) -> torch.Tensor:
    """``(3, 2)``: the three points whose random moves define the elastic op's affine warp.

    As albumentations 0.4.3's ``elastic_transform``: the centre ``side // 2`` (integer)
    plus ``(+q, +q)``, ``(+q, -q)`` and ``(-q, -q)``, ``q = min(H, W) // 3`` (74 px at 224).
    """
    q = min(height, width) // 3
    cx, cy = width // 2, height // 2
    points = [[cx + q, cy + q], [cx + q, cy - q], [cx - q, cy - q]]
    return torch.tensor(points, device=device, dtype=torch.float32)


def control_point_maps(points: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """``(3, 2)`` points and ``(m, 3, 2)`` where they move -> ``(m, 3, 3)`` output-to-source maps.

    The affine warp that takes each point to its moved place (OpenCV's
    ``getAffineTransform(points, moved)`` applied by ``warpAffine``): the output-to-source
    map is the affine taking ``moved`` back to ``points``, ``A = P D^-1`` with ``D`` the moved
    points as homogeneous columns. ``inv_ex``: no error check, so no wait on an accelerator
    (three moved points on one line have probability zero).
    """
    ones = torch.ones_like(moved[..., :1])
    columns = torch.cat([moved, ones], -1).transpose(1, 2)  # (m, 3, 3): x, y, 1 rows
    inverse = torch.linalg.inv_ex(columns).inverse
    source = torch.cat([points, torch.ones_like(points[:, :1])], -1).T  # (3, 3)
    return source @ inverse


def map_pixels(
    matrices: torch.Tensor, pixels: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Affine output-to-source maps ``(m, 3, 3)`` at every pixel ``(3, H*W)`` -> grid
    ``(m, 2, H, W)`` (the last row is not read: homographies go to :func:`map_projective`).

    One matrix product for the whole batch (a ``K = 3`` batched product per sample is several
    times slower on a CPU).
    """
    count = len(matrices)
    mapped = matrices[:, :2].reshape(count * 2, 3) @ pixels
    return mapped.view(count, 2, height, width)


def map_projective(
    matrices: torch.Tensor, pixels: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """:func:`map_pixels` for homographies: with the perspective divide."""
    count = len(matrices)
    mapped = (matrices.reshape(count * 3, 3) @ pixels).view(count, 3, height, width)
    return mapped[:, :2] / mapped[:, 2:]


def map_grid(matrices: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Affine maps ``(m, 3, 3)`` applied to a per-sample grid ``(m, 2, H, W)`` (elementwise)."""
    a = matrices[:, :2, :, None, None]  # (m, 2, 3, 1, 1)
    return a[:, :, 0] * grid[:, :1] + a[:, :, 1] * grid[:, 1:] + a[:, :, 2]


def fold_reflect101(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Source coordinates ``(m, 2, H, W)`` folded into the image as OpenCV's reflect-101 does.

    ``-x`` for ``x < 0`` and ``2 (n - 1) - x`` for ``x > n - 1``, repeated: the mirrored image
    has period ``2 (n - 1)``.
    """
    folded = []
    for axis, last in ((0, width - 1), (1, height - 1)):
        period = 2 * last
        r = torch.remainder(grid[:, axis], period)
        folded.append(torch.minimum(r, period - r))
    return torch.stack(folded, 1)


def sample(x: torch.Tensor, grid: torch.Tensor, border: str) -> torch.Tensor:
    """``x`` read bilinearly at the source pixels ``grid`` ``(m, 2, H, W)`` (pixel coordinates).

    ``reflect101`` folds the coordinates first; ``zeros`` reads black outside the image (the
    bilinear weights of outside neighbours go to black, as OpenCV's ``BORDER_CONSTANT``).
    """
    _, _, height, width = x.shape
    if border == "reflect101":
        grid = fold_reflect101(grid, height, width)
    scale = grid.new_tensor([2 / (width - 1), 2 / (height - 1)])[None, :, None, None]
    normalised = (grid * scale - 1).permute(0, 2, 3, 1).to(x.dtype)
    # After the fold every point is inside: "border" only absorbs float rounding at the edge.
    padding = "border" if border == "reflect101" else "zeros"
    return F.grid_sample(x, normalised, mode="bilinear", padding_mode=padding, align_corners=True)


def smoothing_matrix(size: int, sigma: float) -> np.ndarray:
    """``(size, size)`` float64 matrix of a 1-D Gaussian filter with mirrored borders.

    scipy's ``gaussian_filter(mode="reflect")`` along one axis, which albumentations 0.4.3's
    elastic field uses: taps to ``4 sigma``, normalised, and the border mirrored about the
    pixel edge (``...b a | a b ...``), repeatedly when the kernel is wider than the image (at
    224 px its sigma of 50 reaches 200 px). In numpy: built on the host once per shape, so no
    training step counts it as a read of a device tensor.
    """
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2) if sigma > 0 else (taps == 0).astype(float)
    weights = weights / weights.sum()
    source = np.arange(size)[:, None] + taps[None, :]  # (size, taps): input index per tap
    period = 2 * size
    r = np.remainder(source, period)
    source = np.where(r < size, r, period - 1 - r)
    matrix = np.zeros((size, size))
    np.add.at(matrix, (np.repeat(np.arange(size), len(taps)), source.ravel()), np.tile(weights, size))
    return matrix


def smoothing_factors(
    size: int, sigma: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)``, each ``(size, r)``, with ``left @ right.T`` the smoothing matrix.

    A wide Gaussian keeps only a few components (7 of 224 at sigma 50): the field
    ``K @ noise @ K.T`` becomes ``left @ (right.T @ noise @ right) @ left.T``, about 30 times
    less work than the dense products (which dominated the elastic op on a CPU).
    """
    u, s, vh = np.linalg.svd(smoothing_matrix(size, sigma))
    rank = int(np.count_nonzero(s > SMOOTHING_RANK_TOLERANCE * s[0]))
    left, right = u[:, :rank] * s[:rank], vh[:rank].T
    return (
        torch.from_numpy(left).float().to(device),
        torch.from_numpy(np.ascontiguousarray(right)).float().to(device),
    )
