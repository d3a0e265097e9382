"""Per-sample filters of the reference augmentation, batched: blur and colour jitter."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale

BLUR_KINDS = ("box", "gaussian")


def blur_radius(widths: list[float]) -> int:
    """Taps on each side of the centre that a blur of the widest ``widths`` (pixels) needs."""
    return max(1, math.ceil(max(widths) / 2 - 0.5))


def box_weights(widths: torch.Tensor, radius: int) -> torch.Tensor:
    """``(m,)`` widths in pixels -> ``(m, 2 radius + 1)`` taps of a box (mean) filter.

    Each tap is the share of the box ``[-w / 2, w / 2]`` that falls on that pixel: an odd
    integer width ``k`` gives ``k`` equal taps of ``1 / k`` (OpenCV's ``blur``); a width
    between (a box scaled with the image) gives partial end taps.
    """
    offsets = torch.arange(-radius, radius + 1, device=widths.device, dtype=widths.dtype)
    half = widths[:, None] / 2
    overlap = torch.minimum(offsets + 0.5, half) - torch.maximum(offsets - 0.5, -half)
    weights = overlap.clamp(min=0)
    return weights / weights.sum(-1, keepdim=True)


def gaussian_weights(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """``(m,)`` sigmas -> ``(m, 2 radius + 1)`` normalised Gaussian taps."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    weights = torch.exp(-(offsets**2) / (2 * sigma[:, None] ** 2))
    return weights / weights.sum(-1, keepdim=True)


def separable_blur(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(m, C, H, W)`` blurred by its own 1-D taps ``(m, taps)`` along both axes.

    Borders mirrored about the edge pixel (torch's ``reflect`` padding is OpenCV's
    ``BORDER_REFLECT_101``, the default of ``cv2.blur``). Narrower kernels padded with zero
    taps give the same result as their own, so one kernel length serves the batch.
    """
    m, channels, height, width = x.shape
    half = weights.shape[1] // 2
    taps = weights.to(x.dtype).repeat_interleave(channels, 0)
    planes = F.pad(x, (half, half, half, half), mode="reflect").reshape(
        1, m * channels, height + 2 * half, width + 2 * half
    )
    planes = F.conv2d(planes, taps[:, None, None, :], groups=m * channels)
    planes = F.conv2d(planes, taps[:, None, :, None], groups=m * channels)
    return planes.reshape(m, channels, height, width)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (factors around 1) and hue (turns), per sample.

    torchvision's formulas, clamped to [0, 1] after each step as Kornia's ``ColorJitter``.
    """
    brightness, contrast, saturation = (f[:, None, None, None] for f in factors[:, :3].unbind(1))
    x = (x * brightness).clamp(0, 1)
    mean = rgb_to_grayscale(x).mean((-2, -1), keepdim=True)
    x = (x * contrast + mean * (1 - contrast)).clamp(0, 1)
    x = (x * saturation + rgb_to_grayscale(x) * (1 - saturation)).clamp(0, 1)
    return hue_shift(x, factors[:, 3])


def hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB ``(m, 3, H, W)`` in [0, 1] by ``turns`` ``(m,)``.

    Same result as an RGB -> HSV -> RGB round trip (``kornia.enhance.adjust_hue``, to ~1e-6),
    without building HSV: value (max) and chroma (max - min) stay, the hue in sextants comes
    from whichever channel is largest, and each output channel is
    ``value - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + hue) mod 6``, n = 5, 3, 1.
    About half the work of the round trip on a CPU.
    """
    value, largest = x.max(1)
    chroma = value - x.amin(1)
    red, green, blue = x.unbind(1)
    safe = torch.where(chroma > 0, chroma, 1.0)
    hue = torch.where(
        largest == 0,
        (green - blue) / safe,
        torch.where(largest == 1, (blue - red) / safe + 2, (red - green) / safe + 4),
    )
    hue = hue + (turns * 6)[:, None, None]
    offsets = 5 - 2 * torch.arange(3, device=x.device, dtype=x.dtype)
    k = torch.remainder(offsets[None, :, None, None] + hue[:, None], 6)
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)
