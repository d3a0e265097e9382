"""Batched augmentation, run after the batch reaches the accelerator.

The reference augmentation is what stops the model from learning to copy-paste the exemplar.
``data/augment=paper`` is the public Paint-by-Example code's (albumentations 0.4.3 with OpenCV,
on the reference crop already squashed to 224 x 224), in its order:

1. horizontal flip, p = 0.5;
2. rotation by an angle uniform in ``[-20, 20]`` degrees about ``(W / 2, H / 2)``, p = 0.5,
   bilinear, border mirrored about the edge pixel (reflect-101), not black;
3. blur, p = 0.3: a box (mean) filter whose size is drawn uniformly from 3, 5, 7, reflect-101;
4. elastic, p = 0.3, that version's defaults (alpha 1, sigma 50, alpha_affine 50, reflect-101):
   first a random **affine** warp, three control points at the centre ``+-(side // 3)`` each
   moved by ``uniform(-50, 50)`` px (the strong part: shear, scale, rotation of tens of
   pixels), then a displacement field, uniform noise in ``[-1, 1]`` smoothed by a Gaussian of
   sigma 50 (mirrored borders) times alpha, well under a pixel.

Our extras, off in ``paper``: colour jitter and perspective on the reference, and a joint
flip of the source image and its mask (``scene``). Each op has a probability; 0 switches it
off, so ``data/augment=none`` is a config with every probability at 0, not a code path. Pixel
amounts (``elastic_alpha_affine``, ``elastic_sigma``, ``elastic_alpha``, ``blur_kernels``) are
for a reference of ``pixels_at_side`` (224) pixels and scale with the actual side, so the
geometry relative to the image is the original's at any ``data.reference_size`` (the
demo's 64 px: the control points move by up to 50 * 64 / 224 = 14.3 px).

Deliberate differences from the original, each below what training can see: values stay
float in [0, 1] between ops (albumentations rounds to uint8 after each one, +-0.5 / 255);
bilinear weights are exact (OpenCV rounds source coordinates to 1/32 px); the elastic op's
affine warp and field are one resampling (OpenCV resamples twice, the second time by the
sub-pixel field); the draws come from torch's generator (not Python's and numpy's), with the
same distributions.

Why not albumentations or Kornia: albumentations works on one image at a time on the host;
Kornia's ``AugmentationSequential`` (what this module used before) runs every op over the whole
batch and resamples once per op, draws its parameters on the host, and has no control-point
affine nor reflect-101 sampling. Here each op runs batched on the device: on an accelerator
nothing waits for the host (ops run on the whole batch and ``torch.where`` keeps the result for
the samples that drew them); on the CPU, where the draws are on the host already, ops run on
the samples that drew them only. Either way a sample that draws no op comes out bit for bit
unchanged, and the flip is an exact mirror (not resampled). A sample is resampled once per
geometric op it draws, as in the original: rotation (with perspective) before the blur, the
elastic warp after it.

Randomness comes from torch's global generator on the batch's device, or from ``generator``:
a resumed run that restores the global RNG state reproduces its batches bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pbe_lightning.data.filters import (
    BLUR_KINDS,
    blur_radius,
    box_weights,
    color_jitter,
    gaussian_weights,
    separable_blur,
)
from pbe_lightning.data.warps import (
    BORDERS,
    control_point_maps,
    control_points,
    fold_reflect101,
    map_grid,
    map_pixels,
    map_projective,
    perspective_maps,
    pixel_grid,
    rotation_maps,
    sample,
    smoothing_factors,
)

# Devices where an op runs on the samples that drew it only (the draws are on the host there).
# Elsewhere every op runs on the whole batch and ``torch.where`` picks: no host sync. Tests empty
# it to run the accelerator path on the CPU.
SUBSET_DEVICES = ("cpu",)

# The reference ops in the order they are applied, which is also the order of the RNG stream:
# one draw per sample and op, then each active op's parameters (shapes below, per sample),
# then the elastic field's noise last.
REFERENCE_OPS = ("hflip", "rotation", "perspective", "color_jitter", "blur", "elastic")
PARAMETERS = {
    "rotation": (),  # the angle
    "perspective": (4, 2),  # how far each corner moves inwards
    "color_jitter": (4,),  # brightness, contrast, saturation, hue
    "blur": (2,),  # which kernel; the sigma of the gaussian kind
    "elastic": (3, 2),  # how far each control point moves, x and y
}
# Smaller references are a config mistake: the elastic op's control points (side // 3 from
# the centre) would nearly coincide.
MIN_SIDE = 8

Rows = slice | torch.Tensor


class Augment(nn.Module):
    """Reference (and scene) augmentation; every argument is a key of ``conf/data/augment``."""

    def __init__(
        self,
        hflip: float = 0.5,
        rotation: float = 0.5,
        rotation_degrees: float = 20.0,
        blur: float = 0.3,
        blur_kind: str = "box",
        blur_kernels: Sequence[float] = (3, 5, 7),
        elastic: float = 0.3,
        elastic_alpha_affine: float = 50.0,
        elastic_alpha: float = 1.0,
        elastic_sigma: float = 50.0,
        border: str = "reflect101",
        pixels_at_side: int = 224,
        color_jitter: float = 0.0,
        color_strength: float = 0.2,
        perspective: float = 0.0,
        scene_hflip: float = 0.0,
    ) -> None:
        super().__init__()
        probabilities = {
            "hflip": hflip,
            "rotation": rotation,
            "perspective": perspective,
            "color_jitter": color_jitter,
            "blur": blur,
            "elastic": elastic,
            "scene_hflip": scene_hflip,
        }
        for name, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(
                    f"data.augment.{name}={p} is not a probability: use a value in [0, 1] "
                    "(0 switches the op off)"
                )
        check_choice("border", border, BORDERS)
        check_choice("blur_kind", blur_kind, BLUR_KINDS)
        kernels = tuple(float(k) for k in blur_kernels)
        if not kernels or min(kernels) <= 0:
            raise ValueError(
                f"data.augment.blur_kernels={list(blur_kernels)}: give one or more kernel sizes "
                "in pixels at pixels_at_side, e.g. [3, 5, 7]"
            )
        for name, value in (
            ("elastic_alpha_affine", elastic_alpha_affine),
            ("elastic_alpha", elastic_alpha),
            ("elastic_sigma", elastic_sigma),
        ):
            if value < 0:
                raise ValueError(f"data.augment.{name}={value}: use a value >= 0 (pixels)")
        if pixels_at_side <= 0:
            raise ValueError(f"data.augment.pixels_at_side={pixels_at_side}: use a side > 0")
        self.p = {name: float(probabilities[name]) for name in REFERENCE_OPS}
        self.scene_hflip = float(scene_hflip)
        self.rotation_degrees = float(rotation_degrees)
        self.blur_kind = blur_kind
        self.blur_kernels = kernels
        self.alpha_affine = float(elastic_alpha_affine)
        self.alpha = float(elastic_alpha)
        self.sigma = float(elastic_sigma)
        self.border = border
        self.pixels_at_side = int(pixels_at_side)
        self.color_strength = float(color_strength)
        self._constants: dict[tuple, object] = {}

    # ------------------------------------------------------------------------------ public
    def reference(
        self, reference: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1] -> same shape, augmented, in [0, 1]."""
        active = [name for name in REFERENCE_OPS if self.p[name] > 0]
        if not active:
            return reference
        n, _, height, width = reference.shape
        if min(height, width) < MIN_SIDE:
            raise ValueError(
                f"references of {height}x{width} px are too small to augment: use "
                f"data.reference_size >= {MIN_SIDE} (the paper's is 224)"
            )
        device = reference.device

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=device)

        draws = uniform(n, len(REFERENCE_OPS))
        drawn = {name: draws[:, REFERENCE_OPS.index(name)] < self.p[name] for name in active}
        params = {name: uniform(n, *PARAMETERS[name]) for name in active if name in PARAMETERS}
        scale = min(height, width) / self.pixels_at_side

        x = reference
        if "hflip" in drawn:
            x = apply_where(x, drawn["hflip"], mirror)
        tilts = [drawn[name] for name in ("rotation", "perspective") if name in drawn]
        if tilts:
            tilt = tilts[0] if len(tilts) == 1 else tilts[0] | tilts[1]
            maps = self._tilt_maps(drawn, params, n, height, width, device)
            projective = "perspective" in drawn
            x = apply_where(
                x,
                tilt,
                lambda xs, rows: self._tilt(xs, maps[rows], projective),
                inplace=x is not reference,
            )
        if "color_jitter" in drawn:
            factors = self._jitter_factors(params["color_jitter"])
            x = apply_where(
                x,
                drawn["color_jitter"],
                lambda xs, rows: color_jitter(xs, factors[rows]),
                inplace=x is not reference,
            )
        if "blur" in drawn:
            weights = self._blur_weights(params["blur"], scale, min(height, width), device)
            x = apply_where(
                x,
                drawn["blur"],
                lambda xs, rows: separable_blur(xs, weights[rows]),
                inplace=x is not reference,
            )
        if "elastic" in drawn:
            moves = params["elastic"] * 2 - 1
            x = apply_where(
                x,
                drawn["elastic"],
                lambda xs, rows: self._elastic(xs, moves[rows], scale, uniform),
                inplace=x is not reference,
            )
        return x.clamp(0, 1) if x is reference else x.clamp_(0, 1)

    def scene(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Source image and its mask, flipped together so the hole stays aligned."""
        if self.scene_hflip <= 0:
            return image, mask
        flip = torch.rand(image.shape[0], generator=generator, device=image.device)
        flip = flip < self.scene_hflip
        return apply_where(image, flip, mirror), apply_where(mask, flip, mirror)

    # ------------------------------------------------------------------------------ warps
    def _tilt_maps(
        self,
        drawn: dict[str, torch.Tensor],
        params: dict[str, torch.Tensor],
        n: int,
        height: int,
        width: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Output-to-source maps ``(B, 3, 3)`` of rotation then perspective, identity where an
        op was not drawn: ``source = R^-1 P^-1 (output)``, one resampling for both."""
        maps = torch.eye(3, device=device).expand(n, 3, 3)
        if "perspective" in drawn:
            maps = perspective_maps(params["perspective"], drawn["perspective"], height, width)
        if "rotation" in drawn:
            angles = (params["rotation"] * 2 - 1) * self.rotation_degrees
            angles = torch.where(drawn["rotation"], angles, torch.zeros_like(angles))
            maps = rotation_maps(angles, height, width) @ maps
        return maps

    def _tilt(self, x: torch.Tensor, maps: torch.Tensor, projective: bool) -> torch.Tensor:
        _, _, height, width = x.shape
        pixels = self._constant(("pixels", height, width), x.device)
        mapping = map_projective if projective else map_pixels
        return sample(x, mapping(maps, pixels, height, width), self.border)

    def _elastic(
        self,
        x: torch.Tensor,
        moves: torch.Tensor,
        scale: float,
        uniform: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        """The elastic op on ``x`` ``(m, C, H, W)``: affine warp of the moved control points,
        then the smoothed-noise field, as one resampling.

        The original reads ``affine_warped(fold(p + d(p)))`` with ``affine_warped(q) =
        x(fold(A^-1 q))``; the same two folds on the coordinates give one ``grid_sample``.
        The field's noise is drawn here, last in the call's stream, for the samples the op
        runs on (those that drew it on the CPU, all of them on an accelerator).
        """
        m, _, height, width = x.shape
        pixels = self._constant(("pixels", height, width), x.device)
        points = self._constant(("points", height, width), x.device)
        maps = control_point_maps(points, points + moves * (self.alpha_affine * scale))
        if self.alpha == 0:
            return sample(x, map_pixels(maps, pixels, height, width), self.border)
        grid = pixels[:2].view(1, 2, height, width) + self._field(
            uniform(m, 2, height, width), scale
        )
        if self.border == "reflect101":
            grid = fold_reflect101(grid, height, width)
        return sample(x, map_grid(maps, grid), self.border)

    def _field(self, noise: torch.Tensor, scale: float) -> torch.Tensor:
        """Uniform noise ``(m, 2, H, W)`` in [0, 1) -> displacement ``(m, 2, H, W)`` in pixels.

        ``alpha * gaussian(2 noise - 1, sigma)``, x then y, sigma scaled with the side. The
        noise is per pixel, so a window that grows with the side averages more pixels and the
        field shrinks as ``1 / side``: the extra ``scale`` keeps it the same fraction of the
        side, i.e. ``alpha * scale**2`` in all.
        """
        _, _, height, width = noise.shape
        sigma = self.sigma * scale
        left_h, right_h = self._constant(("smooth", height, sigma), noise.device)
        left_w, right_w = self._constant(("smooth", width, sigma), noise.device)
        core = right_h.T @ (noise * 2 - 1) @ right_w
        return left_h @ core @ left_w.T * (self.alpha * scale**2)

    # ------------------------------------------------------------------------------ filters
    def _blur_weights(
        self, uniform: torch.Tensor, scale: float, side: int, device: torch.device
    ) -> torch.Tensor:
        """``(B, 2)`` uniforms -> ``(B, taps)``: a kernel size drawn uniformly from
        ``blur_kernels`` (scaled with the side); box, or a Gaussian of that support with a
        sigma uniform in ``[0.1, max(0.2, size / 3)]`` (Kornia's ``RandomGaussianBlur`` range)."""
        kernels = self._constant(("kernels",), device)
        count = len(self.blur_kernels)
        index = (uniform[:, 0] * count).long().clamp_(max=count - 1)
        widths = kernels[index] * scale
        radius = blur_radius([k * scale for k in self.blur_kernels])
        if radius >= side:  # the mirrored border would run out of image
            raise ValueError(
                f"data.augment.blur_kernels={list(self.blur_kernels)} at pixels_at_side="
                f"{self.pixels_at_side} is {2 * radius + 1} px wide on {side} px references: "
                "use smaller kernels or a larger pixels_at_side"
            )
        if self.blur_kind == "box":
            return box_weights(widths, radius)
        high = (widths / 3).clamp(min=0.2)
        return gaussian_weights(0.1 + (high - 0.1) * uniform[:, 1], radius)

    def _jitter_factors(self, uniform: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` uniforms -> brightness, contrast, saturation factors and hue in turns.

        Factors in ``[max(0, 1 - s), 1 + s]``, hue in ``[-s / 4, s / 4]`` turns, ``s`` the
        ``color_strength``: Kornia's ``ColorJitter(s, s, s, s / 4)`` ranges.
        """
        s = self.color_strength
        low = max(0.0, 1 - s)
        factors = low + (1 + s - low) * uniform[:, :3]
        hue = (uniform[:, 3:] * 2 - 1) * (s / 4)
        return torch.cat([factors, hue], dim=1)

    # ------------------------------------------------------------------------------ helpers
    def _constant(self, key: tuple, device: torch.device):
        """Built once per device: a host tensor copied to an accelerator would wait for it."""
        full = (*key, str(device))
        value = self._constants.get(full)
        if value is None:
            kind = key[0]
            if kind == "pixels":
                value = pixel_grid(key[1], key[2], device)
            elif kind == "points":
                value = control_points(key[1], key[2], device)
            elif kind == "smooth":
                value = smoothing_factors(key[1], key[2], device)
            else:
                value = torch.tensor(self.blur_kernels, device=device)
            self._constants[full] = value
        return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"data.augment.{name}={value!r}: use one of {', '.join(choices)}")


def mirror(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Horizontal flip (an exact copy); ``rows`` unused, for :func:`apply_where`."""
    return x.flip(-1)


def apply_where(
    x: torch.Tensor,
    drawn: torch.Tensor,
    op: Callable[[torch.Tensor, Rows], torch.Tensor],
    inplace: bool = False,
) -> torch.Tensor:
    """``op`` on the samples where ``drawn``; the others come back unchanged, bit for bit.

    ``op(samples, rows)`` gets the samples and the rows they are (to index its parameters).
    On the CPU it runs on those samples only (``inplace``: written into ``x``, which the caller
    owns); on an accelerator on all of them, and ``torch.where`` keeps its result where drawn
    (no host sync for the count).
    """
    if x.device.type not in SUBSET_DEVICES:
        return torch.where(drawn.view(-1, *([1] * (x.dim() - 1))), op(x, slice(None)), x)
    rows = drawn.nonzero().squeeze(1)
    if len(rows) == 0:
        return x
    if len(rows) == len(x):
        return op(x, slice(None))
    out = x if inplace else x.clone()
    return out.index_copy_(0, rows, op(x.index_select(0, rows), rows))
