"""The reference augmentation against the public Paint-by-Example code's, written from its facts.

The original (albumentations 0.4.3 + OpenCV on the 224 px reference crop), in this order:
horizontal flip p=0.5; rotation by uniform(-20, 20) degrees about (W/2, H/2), p=0.5, bilinear,
border reflect-101; box blur p=0.3 with a kernel of 3, 5 or 7 (equally likely), reflect-101;
elastic p=0.3: an affine warp moving three control points (centre +- side // 3) by
uniform(-50, 50) px each, then a sub-pixel smoothed-noise field, reflect-101. The references
are numpy (tests/helpers/warp_references.py), not our code. Where a test needs the warp a sample drew, it reads it off the output:
channels 0 and 1 of the input are the pixel's own x and y (a linear ramp survives bilinear
sampling and box blurs exactly), so the output says which source pixel each pixel came from.
"""

import functools
import math

import kornia
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from pbe_lightning.data import augment as augment_module
from pbe_lightning.data import filters
from pbe_lightning.data.augment import Augment
from tests.helpers.config import CONF
from tests.helpers.counters import CountOps
from tests.helpers.warp_references import (
    fitted_map,
    ks_limit,
    ks_uniform,
    mean_taps,
    np_box,
    np_gaussian_matrix,
    np_warp,
    with_ramps,
)

PRESETS = ("paper", "none", "strong")
ONLY = dict(hflip=0, rotation=0, blur=0, elastic=0, color_jitter=0, perspective=0)


@functools.cache
def augment_config(name: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=["debug=tiny", f"data/augment={name}"]).data.augment


def load_augment(name: str, **overrides) -> Augment:
    """``conf/data/augment/<name>.yaml`` as the real config tree composes it, plus overrides."""
    return instantiate(augment_config(name), **overrides)


def paper_only(*ops: str, **overrides) -> Augment:
    """The paper preset with every reference op but ``ops`` switched off."""
    off = {op: 0.0 for op in ONLY if op not in ops}
    return load_augment("paper", **{**off, **overrides})


@pytest.fixture(params=["cpu-subsets", "accelerator-path"])
def path(request, monkeypatch):
    """Both code paths on the CPU: ops on the drawn samples only, or on all and torch.where."""
    if request.param == "accelerator-path":
        monkeypatch.setattr(augment_module, "SUBSET_DEVICES", ())
    return request.param


def same_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a == b).flatten(1).all(1)


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_keeps_reference_shape_and_range(name, path):
    torch.manual_seed(0)
    reference = torch.rand(16, 3, 64, 64)
    before = reference.clone()
    out = load_augment(name).reference(reference)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(reference, before)  # the input is never written


def test_none_is_the_identity_and_paper_changes_something(path):
    reference = torch.rand(8, 3, 64, 64)
    assert torch.equal(load_augment("none").reference(reference), reference)
    torch.manual_seed(0)
    assert not torch.equal(load_augment("paper").reference(reference), reference)


@pytest.mark.parametrize("name", ["paper", "every op at 0.3"])
def test_samples_that_draw_no_op_come_out_bit_identical(name, path):
    # The unchanged samples must be exactly the input (not resampled on an identity grid),
    # and as many as the probabilities say.
    if name == "paper":  # pixel amounts as at 224 (a 3 px box scaled to 16 px is no blur)
        augment = load_augment(name, pixels_at_side=16)
    else:
        augment = Augment(**{op: 0.3 for op in augment_module.REFERENCE_OPS})
    untouched = math.prod(1 - augment.p[op] for op in augment_module.REFERENCE_OPS)
    torch.manual_seed(1)
    reference = torch.rand(400, 3, 16, 16)
    out = augment.reference(reference)
    unchanged = same_per_sample(out, reference).float().mean().item()
    assert unchanged == pytest.approx(untouched, abs=0.06)
    assert unchanged > 0


@pytest.mark.parametrize(
    "op, p", [("hflip", 0.5), ("rotation", 0.5), ("blur", 0.3), ("elastic", 0.3)]
)
def test_paper_draws_each_op_with_the_originals_probability(op, p):
    # 10k samples, the op alone (16 px, its pixel amounts as at 224): the share changed is p
    # within 4 binomial standard deviations.
    n = 10_000
    augment = paper_only(op, pixels_at_side=16)
    assert augment.p[op] == p
    torch.manual_seed(0)
    reference = torch.rand(n, 3, 16, 16)
    changed = (~same_per_sample(augment.reference(reference), reference)).float().mean().item()
    assert abs(changed - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_flip_alone_is_an_exact_mirror(path):
    torch.manual_seed(0)
    reference = torch.rand(64, 3, 32, 32)
    out = Augment(**{**ONLY, "hflip": 0.5}).reference(reference)
    flipped = same_per_sample(out, reference.flip(-1))
    kept = same_per_sample(out, reference)
    assert (flipped | kept).all()
    assert 0.3 < flipped.float().mean() < 0.7


# ----------------------------------------------------------------------------- rotation
def test_rotation_is_opencvs_with_mirrored_borders(path):
    # Every output pixel, borders included, equals the numpy reference rotation with the angle
    # read off the output; the rotation is about (W/2, H/2); angles uniform in [-20, 20].
    size, n = 48, 300
    torch.manual_seed(0)
    texture = torch.rand(n, 1, size, size)
    x = with_ramps(texture, texture)
    torch.manual_seed(1)
    out = paper_only("rotation", rotation=1.0).reference(x).double().numpy()
    ys, xs = np.mgrid[0:size, 0:size]
    centre = np.array([size / 2, size / 2, 1.0])
    # A rotation of at most 20 degrees keeps the disc around the centre inside: no fold there.
    disc = (xs - size / 2) ** 2 + (ys - size / 2) ** 2 < (size / 2 - 2) ** 2
    angles = []
    for i in range(n):
        source_map, residual = fitted_map(out[i], disc)
        assert residual < 1e-3
        cos, sin = source_map[0, 0], source_map[1, 0]
        np.testing.assert_allclose(source_map[:2, :2], [[cos, -sin], [sin, cos]], atol=1e-4)
        assert math.hypot(cos, sin) == pytest.approx(1, abs=1e-4)
        np.testing.assert_allclose(source_map @ centre, centre, atol=2e-3)  # fixed point
        angles.append(math.degrees(math.atan2(sin, cos)))
        expected = np_warp(x[i].double().numpy(), source_map, "reflect101")
        np.testing.assert_allclose(out[i], expected, atol=2e-4)
    angles = np.array(angles)
    assert np.abs(angles).max() <= 20 + 1e-3
    assert ks_uniform(angles, -20, 20) < ks_limit(n)


def test_rotation_leaves_no_black_pixels(path):
    # The original mirrors the image into the corners a rotation uncovers: an image with no
    # dark pixel has none after any rotation.
    torch.manual_seed(0)
    reference = 0.25 + 0.75 * torch.rand(200, 3, 40, 40)
    out = paper_only("rotation", rotation=1.0).reference(reference)
    assert not same_per_sample(out, reference).any()
    assert out.amin() >= 0.25 - 1e-6


# ----------------------------------------------------------------------------- blur
@pytest.mark.parametrize("pixels_at_side", [16, 8], ids=["at-224", "side-twice-224"])
def test_blur_is_a_mean_filter_of_a_kernel_drawn_from_3_5_7(pixels_at_side, path):
    # Each blurred sample equals numpy's mean filter with mirrored borders for exactly one of
    # 3, 5, 7 px (scaled with the side: 6, 10, 14 px boxes on an image twice the size), each
    # kernel drawn equally often (chi-square, 2 degrees of freedom, 0.1%).
    n, size = 600, 16
    scale = size / pixels_at_side
    torch.manual_seed(0)
    reference = torch.rand(n, 3, size, size)
    out = paper_only("blur", blur=1.0, pixels_at_side=pixels_at_side).reference(reference)
    counts = dict.fromkeys((3, 5, 7), 0)
    for image, result in zip(reference.double().numpy(), out.double().numpy()):
        matches = [
            k for k in counts if np.abs(np_box(image, mean_taps(k * scale)) - result).max() < 1e-5
        ]
        assert len(matches) == 1
        counts[matches[0]] += 1
    expected = n / 3
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 13.8


def test_gaussian_blur_kind_is_kornias_gaussian_blur():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 40, 40)
    sigma = torch.rand(5) * 2 + 0.1
    ours = filters.separable_blur(x, filters.gaussian_weights(sigma, 3))
    theirs = kornia.filters.gaussian_blur2d(x, (7, 7), sigma[:, None].expand(-1, 2))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- elastic
def elastic_maps(size: int, n: int, **overrides) -> list[np.ndarray]:
    """The affine output-to-source map each sample's elastic op applied, read off the ramps.

    Black borders for the reading only (``border=zeros``): a constant channel of ones then
    says exactly which output pixels read the image inside; the warp itself is the preset's.
    """
    torch.manual_seed(0)
    x = with_ramps(torch.zeros(n, 1, size, size), torch.ones(n, 1, size, size))
    augment = paper_only("elastic", elastic=1.0, border="zeros", **overrides)
    out = augment.reference(x).double().numpy()
    maps = []
    for sample in out:
        inside = sample[2] >= 1 - 1e-6
        assert inside.sum() >= 50
        source_map, residual = fitted_map(sample, inside)
        assert residual < 0.05  # an affine warp plus the field, well under a pixel
        maps.append(source_map)
    return maps


@pytest.mark.parametrize("size, n", [(224, 96), (64, 400)])
def test_elastic_moves_three_control_points_uniformly_by_50_px_at_224(size, n):
    # Forward map = inverse of the output-to-source map; where it takes the control points
    # (centre +- size // 3) is uniform(-50, 50) px per coordinate at 224, 50 * size / 224 else.
    reach = 50 * size / 224
    centre, q = size // 2, size // 3
    points = np.array(
        [[centre + q, centre + q, 1], [centre + q, centre - q, 1], [centre - q] * 2 + [1]]
    )
    moves = []
    for source_map in elastic_maps(size, n):
        moved = (np.linalg.inv(source_map) @ points.T).T
        moves.append(moved[:, :2] - points[:, :2])
    moves = np.concatenate(moves).ravel()
    assert np.abs(moves).max() <= reach + 0.05
    assert ks_uniform(moves, -reach, reach) < ks_limit(len(moves))


def test_elastic_mirrors_its_borders(path):
    # Even a strong warp leaves no black: what it pulls in from outside is mirrored.
    torch.manual_seed(0)
    reference = 0.25 + 0.75 * torch.rand(100, 3, 48, 48)
    out = paper_only("elastic", elastic=1.0).reference(reference)
    assert out.amin() >= 0.25 - 1e-6


def test_elastic_field_is_the_originals_relative_to_the_side():
    # The field alone (no affine), made measurable with alpha 1000: its size relative to the
    # side at 64 px equals the original's at 224 px (uniform noise in [-1, 1], Gaussian sigma
    # 50 with mirrored borders, times alpha) within sampling error.
    alpha, size, n = 1000.0, 64, 100
    x = with_ramps(torch.zeros(n, 1, size, size))
    torch.manual_seed(0)
    augment = paper_only("elastic", elastic=1.0, elastic_alpha_affine=0, elastic_alpha=alpha)
    out = augment.reference(x).double().numpy()
    inner = slice(size // 8, -size // 8)  # away from the mirrored borders
    ys, xs = np.mgrid[0:size, 0:size]
    moved = np.stack([out[:, 0] * (size - 1) - xs, out[:, 1] * (size - 1) - ys], 1)
    ours = moved[..., inner, inner].std() / size

    rng = np.random.default_rng(0)
    smooth = np_gaussian_matrix(224, 50.0)
    fields = [smooth @ (rng.random((224, 224)) * 2 - 1) @ smooth.T * alpha for _ in range(n)]
    inner = slice(224 // 8, -224 // 8)
    original = np.stack(fields)[:, inner, inner].std() / 224
    assert ours == pytest.approx(original, rel=0.2)


# ----------------------------------------------------------------------------- order
@pytest.mark.parametrize("warp", ["rotation", "elastic"])
def test_blur_sits_after_rotation_and_before_elastic(warp, path):
    # Rotation + blur must equal blur(rotate(x)); elastic + blur must equal elastic(blur(x))
    # (the field off so that the warp is one affine map the numpy reference can apply).
    size, n = 40, 24
    torch.manual_seed(0)
    texture = torch.rand(n, 1, size, size)
    x = with_ramps(texture, texture)
    # Kernels of 3, 5, 7 px at this size; control points moved by up to 5 px, so that the
    # centre, where the ramps are read, comes from well inside the image.
    overrides = dict(pixels_at_side=size, elastic_alpha_affine=5, elastic_alpha=0.0)
    augment = paper_only(warp, "blur", **{warp: 1.0, "blur": 1.0, **overrides})
    out = augment.reference(x).double().numpy()
    inner = np.zeros((size, size), bool)
    inner[size // 2 - 3 : size // 2 + 4, size // 2 - 3 : size // 2 + 4] = True
    wrong_order = []
    for i in range(n):
        source_map, _ = fitted_map(out[i], inner)  # ramps survive a box blur in the interior
        image = x[i].double().numpy()
        errors = []
        for k in (3, 5, 7):
            taps = mean_taps(k)
            if warp == "rotation":
                expected = np_box(np_warp(image, source_map, "reflect101"), taps)
                swapped = np_warp(np_box(image, taps), source_map, "reflect101")
            else:
                expected = np_warp(np_box(image, taps), source_map, "reflect101")
                swapped = np_box(np_warp(image, source_map, "reflect101"), taps)
            errors.append([np.abs(out[i][2] - r[2]).max() for r in (expected, swapped)])
        right, wrong = min(errors)
        assert right < 2e-4
        wrong_order.append(wrong)
    # The two orders differ little where the warp is near the identity, clearly elsewhere.
    assert np.median(wrong_order) > 0.02


# ----------------------------------------------------------------------------- streams
def test_same_seed_same_output_and_generator_argument(path):
    augment = load_augment("strong")
    reference = torch.rand(16, 3, 32, 32)
    torch.manual_seed(5)
    first = augment.reference(reference)
    torch.manual_seed(5)
    second = augment.reference(reference)
    assert torch.equal(first, second)
    torch.manual_seed(6)
    assert not torch.equal(augment.reference(reference), first)
    with_generator = augment.reference(reference, generator=torch.Generator().manual_seed(5))
    assert torch.equal(with_generator, first)  # same stream as the global generator


@pytest.mark.parametrize("elastic", [0.0, 1.0])
def test_cpu_and_accelerator_paths_agree(elastic, monkeypatch):
    # Elastic noise is drawn for the drawn samples on the CPU and for all on an accelerator,
    # so the streams only coincide when every sample or none draws it.
    augment = Augment(
        hflip=0.5, rotation=0.5, perspective=0.5, color_jitter=0.5, blur=0.5, elastic=elastic
    )
    reference = torch.rand(16, 3, 32, 32)
    torch.manual_seed(2)
    subsets = augment.reference(reference)
    monkeypatch.setattr(augment_module, "SUBSET_DEVICES", ())
    torch.manual_seed(2)
    everything = augment.reference(reference)
    torch.testing.assert_close(subsets, everything, atol=1e-5, rtol=0)


def test_no_per_sample_loop(monkeypatch):
    # On the accelerator path the number of torch ops does not depend on the batch size.
    monkeypatch.setattr(augment_module, "SUBSET_DEVICES", ())
    augment = load_augment("strong")
    augment.reference(torch.rand(1, 3, 32, 32))  # builds the cached grid and kernels
    counts = []
    for batch in (2, 16):
        with CountOps() as ops:
            augment.reference(torch.rand(batch, 3, 32, 32))
            augment.scene(torch.rand(batch, 3, 32, 32), torch.ones(batch, 1, 32, 32))
        counts.append(ops.count)
    assert counts[0] == counts[1]


# ----------------------------------------------------------------------------- errors, jitter, scene
def test_bad_settings_name_the_config_key():
    for kwargs, key in (
        (dict(rotation=1.5), "data.augment.rotation"),
        (dict(border="reflect"), "data.augment.border"),
        (dict(blur_kind="median"), "data.augment.blur_kind"),
        (dict(blur_kernels=[]), "data.augment.blur_kernels"),
        (dict(elastic_alpha_affine=-1), "data.augment.elastic_alpha_affine"),
    ):
        with pytest.raises(ValueError, match=key):
            Augment(**kwargs)
    with pytest.raises(ValueError, match="data.reference_size"):
        Augment().reference(torch.rand(2, 3, 4, 4))


def test_color_jitter_matches_kornia():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 40, 40)
    factors = torch.cat([torch.rand(5, 3) * 0.4 + 0.8, torch.rand(5, 1) * 0.1 - 0.05], 1)
    jitter = kornia.augmentation.ColorJitter(0.2, 0.2, 0.2, 0.05, p=1.0, order=(0, 1, 2, 3))
    params = jitter.forward_parameters(x.shape)
    for i, key in enumerate(("brightness", "contrast", "saturation", "hue")):
        params[f"{key}_factor"] = factors[:, i]
    ours = filters.color_jitter(x, factors)
    torch.testing.assert_close(ours, jitter(x, params=params), atol=1e-5, rtol=0)


def test_scene_flip_keeps_the_mask_aligned_with_the_image(path):
    # The hole's pixels are painted white in the image; after a joint flip the white pixels
    # must still be exactly where the mask says EDIT, and both flipped for some samples.
    torch.manual_seed(0)
    mask = torch.ones(16, 1, 32, 32)
    mask[:, :, 8:20, 2:10] = 0
    image = torch.where(mask == 0, torch.ones(16, 3, 32, 32), -torch.ones(16, 3, 32, 32))
    image_out, mask_out = Augment(scene_hflip=0.5, hflip=0, rotation=0, blur=0, elastic=0).scene(
        image, mask
    )
    assert image_out.shape == image.shape and mask_out.shape == mask.shape
    assert torch.equal((image_out[:, :1] > 0), (mask_out == 0))
    assert torch.equal(mask_out.unique(), torch.tensor([0.0, 1.0]))  # still exactly binary
    flipped = (mask_out != mask).flatten(1).any(1)
    assert 0 < flipped.sum() < 16
    assert torch.equal(mask_out[flipped], mask[flipped].flip(-1))
