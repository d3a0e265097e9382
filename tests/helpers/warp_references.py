"""Independent numpy references for the augmentation tests, written from the original's facts
(albumentations 0.4.3 + OpenCV), not from our code: bilinear warps that fold the *neighbour
indices* as OpenCV's borderInterpolate does (ours folds coordinates), mean and Gaussian
filters over numpy's padding, and the readings of a warp off ramp channels."""

from __future__ import annotations

import math

import numpy as np
import torch


def fold101(index: np.ndarray, n: int) -> np.ndarray:
    """Integer pixel indices mirrored about the edge pixels (OpenCV's BORDER_REFLECT_101)."""
    period = 2 * (n - 1)
    r = np.mod(index, period)
    return np.where(r > n - 1, period - r, r)


def np_warp(image: np.ndarray, source_map: np.ndarray, border: str) -> np.ndarray:
    """``(C, H, W)`` read bilinearly at ``source_map @ (x, y, 1)`` for every output pixel."""
    _, height, width = image.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    sx = source_map[0, 0] * xs + source_map[0, 1] * ys + source_map[0, 2]
    sy = source_map[1, 0] * xs + source_map[1, 1] * ys + source_map[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    out = np.zeros_like(image, dtype=np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            if border == "reflect101":
                values = image[:, fold101(yi, height), fold101(xi, width)]
            else:
                inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                values = image[:, yi.clip(0, height - 1), xi.clip(0, width - 1)] * inside
            out += wx * wy * values
    return out


def np_box(image: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` filtered by the 1-D ``taps`` along both axes, numpy's reflect padding
    (``d c b | a b c d``, the edge pixel not repeated: reflect-101)."""
    half = len(taps) // 2
    padded = np.pad(image, ((0, 0), (half, half), (half, half)), mode="reflect")
    _, height, width = image.shape
    rows = sum(t * padded[:, :, i : i + width] for i, t in enumerate(taps))
    return sum(t * rows[:, i : i + height, :] for i, t in enumerate(taps))


def mean_taps(width: float) -> np.ndarray:
    """A box ``width`` px wide centred on a pixel: each tap is its share of the box."""
    half = width / 2
    radius = math.ceil(half - 0.5)
    offsets = np.arange(-radius, radius + 1)
    share = np.minimum(offsets + 0.5, half) - np.maximum(offsets - 0.5, -half)
    return share.clip(0) / width


def with_ramps(texture: torch.Tensor, third: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 3, S, S)``: channel 0 = x / (S - 1), channel 1 = y / (S - 1), channel 2 =
    ``third`` (default: the texture's first channel)."""
    n, _, size, _ = texture.shape
    ramp = torch.arange(size, dtype=torch.float32) / (size - 1)
    xs = ramp.expand(n, 1, size, size)
    ys = ramp[:, None].expand(n, 1, size, size)
    third = texture[:, :1] if third is None else third
    return torch.cat([xs, ys, third], 1).contiguous()


def fitted_map(out: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float]:
    """The affine output-to-source map ``(3, 3)`` read off the ramp channels at ``valid``
    pixels (least squares), and the largest residual in pixels."""
    _, height, width = out.shape
    ys, xs = np.nonzero(valid)
    design = np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float64)
    target = np.stack([out[0][valid] * (width - 1), out[1][valid] * (height - 1)], 1)
    coeffs, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = np.abs(design @ coeffs - target).max()
    return np.vstack([coeffs.T, [0, 0, 1]]), float(residual)


def ks_uniform(values: np.ndarray, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance of ``values`` from uniform(low, high)."""
    u = np.sort((values - low) / (high - low))
    n = len(u)
    grid = np.arange(1, n + 1) / n
    return float(max(np.abs(grid - u).max(), np.abs(grid - 1 / n - u).max()))


def ks_limit(n: int) -> float:
    return 1.95 / math.sqrt(n)  # the 0.1% critical value: a fixed seed never trips a right op


def np_gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """The 1-D Gaussian filter (taps to 4 sigma, normalised) with borders mirrored about the
    pixel edge (numpy's symmetric padding, repeated), as a matrix: row i = output pixel i."""
    radius = int(4 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(np.eye(size), ((radius, radius), (0, 0)), mode="symmetric")
    return sum(t * padded[i : i + size] for i, t in enumerate(taps))
