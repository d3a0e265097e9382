"""Masks. Ours (``outline=ours``, ``edge=hard``) keep their tests; the public code's
(``outline=original``, ``edge=soft``) are checked against references written here from its
rules: its Bezier points and ``randint`` jitter, the points it skips (measured with the
``bezier`` package it uses), and its masks drawn by PIL at the source resolution and resized
bilinearly."""

import functools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pbe_lightning.data import masks as masks_module
from pbe_lightning.data.crops import CropSampler
from pbe_lightning.data.masks import (
    EDIT,
    KEEP,
    MaskGenerator,
    bezier_outline,
    box_masks,
    mask_from_user_image,
    original_outline,
    outline_keep_flags,
    polygon_masks,
)
from tests.helpers.counters import CountOps

SIZE = 64
OURS = functools.partial(MaskGenerator, outline="ours", edge="hard")


def random_boxes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Object boxes and enlarged boxes containing them, normalised."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g) * 0.4 + 0.3
    half = torch.rand(n, 2, generator=g) * 0.15 + 0.08
    obj = torch.cat([centre - half, centre + half], dim=1)
    grow = torch.rand(n, 4, generator=g) * 0.1
    enlarged = torch.cat([obj[:, :2] - grow[:, :2], obj[:, 2:] + grow[:, 2:]], dim=1).clamp(0, 1)
    return obj, enlarged


def inside(boxes: torch.Tensor, size: int) -> torch.Tensor:
    return box_masks(boxes, size) == EDIT


def test_box_mask_marks_exactly_the_box_as_edit():
    mask = box_masks(torch.tensor([[0.25, 0.5, 0.75, 1.0]]), 8)
    assert mask.shape == (1, 1, 8, 8)
    expected = torch.full((8, 8), KEEP)
    expected[4:8, 2:6] = EDIT
    assert torch.equal(mask[0, 0], expected)


def test_polygon_fill_of_a_square_matches_the_box_mask():
    square = torch.tensor([[[0.2, 0.2], [0.7, 0.2], [0.7, 0.7], [0.2, 0.7]]])
    assert torch.equal(
        polygon_masks(square, SIZE), box_masks(torch.tensor([[0.2, 0.2, 0.7, 0.7]]), SIZE)
    )


def test_polygon_fill_of_a_triangle_has_half_the_area():
    triangle = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    hole_fraction = (polygon_masks(triangle, 128) == EDIT).float().mean().item()
    assert hole_fraction == pytest.approx(0.5, abs=0.01)


def test_irregular_masks_lie_inside_the_enlarged_box_and_cover_the_object():
    obj, enlarged = random_boxes(64)
    masks = OURS(irregular_prob=1.0, jitter=0.01)(obj, enlarged, SIZE)
    hole = masks == EDIT
    # Nothing outside the enlarged box...
    assert not (hole & ~inside(enlarged, SIZE)).any()
    # ...and most of every object box (jitter may nibble its border).
    obj_pixels = inside(obj, SIZE)
    coverage = (hole & obj_pixels).flatten(1).sum(1) / obj_pixels.flatten(1).sum(1)
    assert coverage.min() > 0.9
    # And they are not just the rectangle again.
    assert (hole != inside(enlarged, SIZE)).flatten(1).any(1).float().mean() > 0.9


def test_bezier_outline_points_stay_in_the_enlarged_box():
    obj, enlarged = random_boxes(16, seed=3)
    poly = bezier_outline(obj, enlarged, points_per_edge=18, jitter=0.05)
    assert poly.shape == (16, 72, 2)
    assert (poly[..., 0] >= enlarged[:, None, 0] - 1e-6).all()
    assert (poly[..., 1] <= enlarged[:, None, 3] + 1e-6).all()


@pytest.mark.parametrize("prob, expected", [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_irregular_probability_picks_the_shape(prob, expected):
    obj, enlarged = random_boxes(400, seed=1)
    g = torch.Generator().manual_seed(0)
    masks = OURS(irregular_prob=prob)(obj, enlarged, 32, generator=g)
    is_rect = (masks == box_masks(enlarged, 32)).flatten(1).all(1)
    assert (~is_rect).float().mean().item() == pytest.approx(expected, abs=0.07)


def test_bad_probability_is_rejected_with_the_config_key():
    with pytest.raises(ValueError, match="data.mask.irregular_prob"):
        MaskGenerator(irregular_prob=1.5)


def test_user_mask_files_white_is_edit():
    user = torch.tensor([[[[1.0, 0.0]]]])
    assert mask_from_user_image(user).tolist() == [[[[EDIT, KEEP]]]]


def brute_force_fill(polygons: torch.Tensor, size: int) -> torch.Tensor:
    """Even-odd rule pixel by pixel: count the edges crossing each pixel's row left of it."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    start, end = polygons, torch.roll(polygons, shifts=-1, dims=1)
    sx, sy = start[..., 0][:, None, None, :], start[..., 1][:, None, None, :]
    ex, ey = end[..., 0][:, None, None, :], end[..., 1][:, None, None, :]
    py, px = centres[None, :, None, None], centres[None, None, :, None]
    crosses = (sy > py) != (ey > py)
    safe_dy = torch.where(ey == sy, torch.ones_like(ey), ey - sy)
    x_cross = sx + (py - sy) * (ex - sx) / safe_dy
    left = (crosses & (x_cross < px)).sum(-1)
    return torch.where(left % 2 == 1, EDIT, KEEP)[:, None]


@pytest.mark.parametrize("size", [17, 32, 45])
def test_polygon_fill_matches_the_pixel_by_pixel_even_odd_rule(size):
    obj, enlarged = random_boxes(32, seed=5)
    polygons = bezier_outline(obj, enlarged, points_per_edge=6, jitter=0.05)
    # Plus self-intersecting stars and polygons with vertices exactly on pixel centres.
    g = torch.Generator().manual_seed(0)
    stars = torch.rand(8, polygons.shape[1], 2, generator=g)
    on_centres = (torch.randint(0, size, (8, polygons.shape[1], 2), generator=g) + 0.5) / size
    polygons = torch.cat([polygons, stars, on_centres])
    masks = polygon_masks(polygons, size)
    assert masks.dtype == torch.float32
    assert torch.equal(masks, brute_force_fill(polygons, size))


@pytest.fixture
def accelerator_path(monkeypatch):
    monkeypatch.setattr(masks_module, "SUBSET_DEVICES", ())


KINDS = {
    "ours": dict(outline="ours", edge="hard"),
    "original": dict(outline="original", edge="soft"),
    "original outline, hard edge": dict(outline="original", edge="hard"),
    "our outline, soft edge": dict(outline="ours", edge="soft"),
}


def crop_sizes(n: int) -> torch.Tensor:
    """Crop sizes in source pixels: smaller and larger than the output, squashed ones too."""
    g = torch.Generator().manual_seed(n)
    return torch.randint(30, 400, (n, 2), generator=g).float()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_cpu_and_accelerator_paths_draw_the_same_masks(kind, prob, monkeypatch):
    obj, enlarged = random_boxes(64, seed=2)
    generator = MaskGenerator(irregular_prob=prob, **KINDS[kind])
    extras = dict(crop_px=crop_sizes(64))
    subsets = generator(obj, enlarged, 48, torch.Generator().manual_seed(1), **extras)
    monkeypatch.setattr(masks_module, "SUBSET_DEVICES", ())
    everything = generator(obj, enlarged, 48, torch.Generator().manual_seed(1), **extras)
    assert torch.equal(subsets, everything)
    assert subsets.shape == (64, 1, 48, 48) and subsets.dtype == torch.float32
    assert subsets.min() == EDIT and subsets.max() == KEEP
    if KINDS[kind]["edge"] == "hard":
        assert torch.equal(subsets.unique(), torch.tensor([EDIT, KEEP]))
    else:  # the hole's border is soft
        assert ((subsets > 0) & (subsets < 1)).any()


def test_same_global_seed_same_masks():
    obj, enlarged = random_boxes(16, seed=4)
    torch.manual_seed(9)
    first = MaskGenerator()(obj, enlarged, 32)
    torch.manual_seed(9)
    assert torch.equal(MaskGenerator()(obj, enlarged, 32), first)


@pytest.mark.parametrize(
    "kind, filler", [("ours", "polygon_holes"), ("original", "soft_polygon_holes")]
)
def test_polygons_are_filled_only_for_samples_that_draw_them(kind, filler, monkeypatch):
    filled = []
    real = getattr(masks_module, filler)

    def counting(polygons, *args, **kwargs):
        filled.append(len(polygons))
        return real(polygons, *args, **kwargs)

    monkeypatch.setattr(masks_module, filler, counting)
    obj, enlarged = random_boxes(64, seed=2)
    MaskGenerator(irregular_prob=1e-9, **KINDS[kind])(obj, enlarged, 32)
    assert filled == []
    MaskGenerator(irregular_prob=0.5, **KINDS[kind])(obj, enlarged, 32)
    assert len(filled) == 1 and 10 < filled[0] < 54


@pytest.mark.parametrize("kind", KINDS)
def test_no_per_sample_loop(kind, accelerator_path):
    # The number of torch ops does not depend on the batch size.
    counts = []
    for batch in (2, 32):
        obj, enlarged = random_boxes(batch, seed=batch)
        extras = dict(crop_px=crop_sizes(batch), outline_keep=torch.ones(batch, 4, 19).bool())
        with CountOps() as ops:
            MaskGenerator(irregular_prob=0.5, **KINDS[kind])(obj, enlarged, 32, **extras)
        counts.append(ops.count)
    assert counts[0] == counts[1]


@pytest.mark.parametrize(
    "key, value",
    [("outline", "paper"), ("edge", "blurred"), ("points_per_edge", 20), ("jitter_px", 2.5)],
)
def test_bad_settings_name_their_key(key, value):
    with pytest.raises(ValueError, match=f"data.mask.{key}"):
        MaskGenerator(**{key: value})


# -- the public code's masks ------------------------------------------------------------------
def bezier_points(box, grown, t):
    """The 4 curves' points at parameters ``t``, float64: (1-t)^2 P0 + 2t(1-t) P1 + t^2 P2.
    Top, right, bottom, left; each from a corner of ``box`` to the next, its middle control
    point on ``grown``'s edge."""
    x0, y0, x1, y1 = box
    ex0, ey0, ex1, ey1 = grown
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    curves = [
        ((x0, y0), (xm, ey0), (x1, y0)),
        ((x1, y0), (ex1, ym), (x1, y1)),
        ((x1, y1), (xm, ey1), (x0, y1)),
        ((x0, y1), (ex0, ym), (x0, y0)),
    ]
    t = np.asarray(t, dtype=np.float64)[:, None]
    return np.stack(
        [
            (1 - t) ** 2 * np.array(a) + 2 * t * (1 - t) * np.array(b) + t**2 * np.array(c)
            for a, b, c in curves
        ]
    )  # (4, len(t), 2)


def test_original_outline_is_the_bezier_at_t_from_005_to_090_in_source_pixels():
    box, grown = (100.0, 50.0, 300.0, 250.0), (60.0, 30.0, 436.0, 342.0)
    points = original_outline(
        torch.tensor([box], dtype=torch.float64),
        torch.tensor([grown], dtype=torch.float64),
        18,
        0,  # no jitter
        torch.ones(1, 4, 18, dtype=torch.bool),
    )
    expected = bezier_points(box, grown, [0.05 * k for k in range(1, 19)])
    assert points.shape == (1, 72, 2)
    assert np.allclose(points[0].numpy(), expected.reshape(72, 2), atol=1e-9)


def test_original_jitter_is_a_uniform_whole_number_of_pixels_from_minus_5_to_5():
    box = torch.tensor([[100.0, 50.0, 300.0, 250.0]] * 200, dtype=torch.float64)
    grown = torch.tensor([[60.0, 30.0, 436.0, 342.0]] * 200, dtype=torch.float64)
    keep = torch.ones(200, 4, 18, dtype=torch.bool)
    still = original_outline(box, grown, 18, 0, keep)
    moved = original_outline(box, grown, 18, 5, keep, torch.Generator().manual_seed(0))
    shift = (moved - still).flatten().numpy()  # 28,800 draws
    assert np.array_equal(shift, shift.round())
    values, counts = np.unique(shift, return_counts=True)
    assert values.tolist() == list(range(-5, 6))
    assert np.allclose(counts / shift.size, 1 / 11, atol=0.01)


# Which points of each curve (1 = t 0.05 ... 18 = t 0.9) the public code keeps, measured with
# the ``bezier`` package (2024.6.20) it evaluates with: it skips a point whose x or y equals,
# in float64, one kept before on the same curve.
KEPT_BY_THE_PUBLIC_CODE = [
    (
        (100, 50, 300, 250),
        (60, 30, 436, 342),
        [
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 16, 17],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 17],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 16, 17],
        ],
    ),
    (
        (0, 0, 200, 150),
        (0, 0, 210, 150),  # three sides do not grow: their curves are straight lines
        [[1], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17, 18], [1, 7, 9], [1]],
    ),
    (
        (37, 81, 402, 377),
        (12, 80, 500, 391),
        [
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 16, 17, 18],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 17],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 16, 17],
        ],
    ),
    (
        (250, 120, 731, 500),
        (190, 37, 902, 680),
        [
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 17, 18],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 18],
        ],
    ),
]


@pytest.mark.parametrize("box, grown, kept", KEPT_BY_THE_PUBLIC_CODE)
def test_the_points_the_public_code_skips(box, grown, kept):
    flags = outline_keep_flags(tuple(map(float, box)), tuple(map(float, grown)))
    assert [[i + 1 for i, keep in enumerate(curve[:18]) if keep] for curve in flags] == kept


@pytest.mark.parametrize("box, grown, kept", KEPT_BY_THE_PUBLIC_CODE[:2])
def test_a_skipped_point_draws_nothing(box, grown, kept):
    keep = torch.zeros(1, 4, 18, dtype=torch.bool)
    for curve, points in enumerate(kept):
        keep[0, curve, [p - 1 for p in points]] = True
    polygon = original_outline(
        torch.tensor([box], dtype=torch.float64),
        torch.tensor([grown], dtype=torch.float64),
        18,
        0,
        keep,
    )[0].numpy()
    expected = bezier_points(box, grown, [0.05 * k for k in range(1, 19)])
    kept_points = np.concatenate([expected[c, [p - 1 for p in ps]] for c, ps in enumerate(kept)])
    # The polygon visits the kept points in order; a skipped one repeats the last kept one.
    distinct = polygon[np.r_[True, (np.diff(polygon, axis=0) != 0).any(1)]]
    assert np.allclose(distinct, kept_points)


def public_code_mask(geometry, width, height, size, irregular, keep):
    """The public code's mask, no jitter: drawn at the source resolution (a slice for the
    rectangle, PIL's polygon for the Bezier shape; 1 keep, 0 hole), cropped, then resized to
    ``size`` as torchvision's ``Resize`` resizes a tensor (bilinear, no antialiasing)."""
    if irregular:
        t = [0.05 * k for k in range(1, 19)]
        points = bezier_points(geometry.object_box, geometry.mask_box, t)
        polygon = [tuple(p) for c in range(4) for k, p in enumerate(points[c]) if keep[c][k]]
        image = Image.new("L", (width, height), 255)
        ImageDraw.Draw(image).polygon(polygon, fill=0)
        full = torch.from_numpy(np.array(image)).float() / 255
    else:
        full = torch.ones(height, width)
        x0, y0, x1, y1 = (int(v) for v in geometry.mask_box)
        full[y0:y1, x0:x1] = 0
    cx0, cy0, cx1, cy1 = (int(v) for v in geometry.crop)
    crop = full[cy0:cy1, cx0:cx1][None, None]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0, 0]


def original_cases(count: int, seed: int = 0):
    """Geometry of the public code's sampler on photos of several sizes (shrunk, enlarged
    and squashed crops), with its kept points."""
    rng = random.Random(seed)
    sampler = CropSampler(mode="original")
    for _ in range(count):
        width, height = rng.choice([(1024, 768), (768, 1024), (800, 800), (640, 480), (300, 400)])
        w, h = rng.randint(width // 6, width // 2), rng.randint(height // 6, height // 2)
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        geometry = sampler((x0, y0, x0 + w, y0 + h), width, height, rng)
        yield geometry, width, height, outline_keep_flags(geometry.object_box, geometry.mask_box)


def generated(geometry, keep, size, irregular, **kinds):
    generator = MaskGenerator(irregular_prob=float(irregular), jitter_px=0, **kinds)
    return generator(
        torch.tensor([geometry.in_crop(geometry.object_box)]),
        torch.tensor([geometry.in_crop(geometry.mask_box)]),
        size,
        crop_px=torch.tensor([geometry.crop_size]),
        outline_keep=torch.tensor([keep]),
    )[0, 0]


@pytest.mark.parametrize("size", [64, 512])
def test_soft_rectangles_are_the_public_codes_resized_masks(size):
    for geometry, width, height, keep in original_cases(12):
        ours = generated(geometry, keep, size, irregular=False)
        expected = public_code_mask(geometry, width, height, size, False, keep)
        assert (ours - expected).abs().max() < 1e-5


@pytest.mark.parametrize("size", [64, 512])
def test_soft_bezier_holes_are_pils_drawing_resized_as_the_public_code(size):
    errors, hard_errors = [], []
    for geometry, width, height, keep in original_cases(12, seed=size):
        expected = public_code_mask(geometry, width, height, size, True, keep)
        hole = (1 - expected).sum()
        ours = generated(geometry, keep, size, irregular=True)
        hard = generated(geometry, keep, size, irregular=True, edge="hard")
        errors.append(((ours - expected).abs().sum() / hole).item())
        hard_errors.append(((hard - expected).abs().sum() / hole).item())
        # Pixels that differ at all are rare (PIL 10+ bends a few corners differently).
        assert ((ours - expected).abs() > 0.05).float().mean() < 0.002
    # Measured: 0.007% (64 px) and 0.013% (512 px) of the hole's area on average, at most 0.1%
    # (without PIL's edge-end and horizontal-edge spans: 0.08-0.1%; the hard edge: ~2-5%).
    assert np.mean(errors) < 0.0004 and max(errors) < 0.0025
    assert np.mean(hard_errors) > 5 * np.mean(errors)


def test_jitter_is_in_source_pixels_whatever_the_output_size():
    """A hole whose outline is its object box: the jitter is all that moves its edge."""
    n = 128
    obj = torch.tensor([[0.25, 0.25, 0.75, 0.75]]).repeat(n, 1)
    for crop_px, most, least in ((64.0, 6, 4), (640.0, 1, 0)):
        extras = dict(crop_px=torch.full((n, 2), crop_px))
        still = MaskGenerator(irregular_prob=1, jitter_px=0)(obj, obj, 64, **extras)
        moved = MaskGenerator(irregular_prob=1)(
            obj, obj, 64, torch.Generator().manual_seed(0), **extras
        )
        hole, moved_hole = still[:, 0] < 0.5, moved[:, 0] < 0.5
        columns = hole.any(1).float().argmax(-1)  # first hole column of each sample
        moved_columns = moved_hole.any(1).float().argmax(-1)
        reach = (columns - moved_columns).max().item()  # 5 source px = 5 or 0.5 output px
        assert least <= reach <= most


def test_soft_masks_with_one_source_pixel_per_output_pixel_are_the_hard_rectangles():
    obj, enlarged = random_boxes(32, seed=6)
    enlarged = (enlarged * 48).round() / 48  # whole source pixels, as the public code's
    soft = MaskGenerator(irregular_prob=0)(obj, enlarged, 48, crop_px=torch.full((32, 2), 48.0))
    assert torch.equal(soft, box_masks(enlarged, 48))
