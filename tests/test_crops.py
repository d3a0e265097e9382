"""Crop-as-reference geometry. ``mode=original`` is checked against a reference written here
from the public Paint-by-Example code's rules (plain Python, none of our code): integer boxes,
``randint`` growth of the box, a ``randint`` square position, a ``randint`` inset, square
images whole, and the whole image (squashed) when fewer than two square positions fit."""

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pbe_lightning.data.crops import BoxFilter, CropSampler, choose_box
from pbe_lightning.data.samples import SampleSpec, SkipSample, make_sample

DRAWS = 10_000


def public_code_geometry(box, width, height, rng):
    """The public code's geometry from its rules, in the order it draws: the box's growth
    (left, top, right, bottom), then the square's position, then the inset."""
    x0, y0, x1, y1 = (int(v) for v in box)
    ex0 = x0 - rng.randint(0, int(0.4 * (x0 - 0)))
    ey0 = y0 - rng.randint(0, int(0.4 * (y0 - 0)))
    ex1 = x1 + rng.randint(0, int(0.4 * (width - x1)))
    ey1 = y1 + rng.randint(0, int(0.4 * (height - y1)))
    whole = (0, 0, width, height)
    if width > height:
        left_most = max(ex1 - height, 0)
        right_most = min(ex0 + height, width) - height
        if right_most <= left_most:
            crop = whole
        else:
            left = rng.randint(left_most, right_most)
            free = min(ey0, ex0 - left, left + height - ex1, height - ey1)
            r = rng.randint(0, int(0.6 * free))
            crop = (left + r, r, left + height - r, height - r)
    elif width < height:
        upper_most = max(ey1 - width, 0)
        lower_most = min(ey0 + width, height) - width
        if lower_most <= upper_most:
            crop = whole
        else:
            upper = rng.randint(upper_most, lower_most)
            free = min(ey0 - upper, ex0, width - ex1, upper + width - ey1)
            r = rng.randint(0, int(0.6 * free))
            crop = (r, upper + r, width - r, upper + width - r)
    else:
        crop = whole
    pad = (max(x0 - 10, 0), max(y0 - 10, 0), min(x1 + 10, width), min(y1 + 10, height))
    return (x0, y0, x1, y1), (ex0, ey0, ex1, ey1), crop, pad


def random_case(rng):
    """An image size and a box in it, landscape, portrait or square, often at an edge."""
    width, height = rng.choice([(640, 480), (480, 640), (500, 500), (1024, 683), (300, 900)])
    w = rng.uniform(0.1, 0.95) * width
    h = rng.uniform(0.1, 0.95) * height
    x0 = rng.choice([0.0, width - w, rng.uniform(0, width - w)])
    y0 = rng.choice([0.0, height - h, rng.uniform(0, height - h)])
    return (x0, y0, x0 + w, y0 + h), width, height


@pytest.mark.parametrize("seed", range(300))
def test_original_geometry_is_the_public_codes_draw_for_draw(seed):
    box, width, height = random_case(random.Random(f"case:{seed}"))
    ours = CropSampler(mode="original")(box, width, height, random.Random(seed))
    obj, grown, crop, pad = public_code_geometry(box, width, height, random.Random(seed))
    assert ours.object_box == obj
    assert ours.mask_box == grown
    assert ours.crop == crop
    assert ours.reference_box == pad
    assert all(float(v).is_integer() for v in (*ours.mask_box, *ours.crop))


def growth(sampler, box, width, height, seeds):
    out = []
    for seed in seeds:
        g = sampler(box, width, height, random.Random(seed))
        (x0, y0, x1, y1), (ex0, ey0, ex1, ey1) = g.object_box, g.mask_box
        out.append((x0 - ex0, y0 - ey0, ex1 - x1, ey1 - y1))
    return np.array(out)


def test_original_growth_is_a_uniform_whole_number_up_to_40_percent_of_the_free_space():
    box, width, height = (100.7, 50.2, 300.9, 250.5), 640, 480  # truncated to 100, 50, 300, 250
    grown = growth(CropSampler(mode="original"), box, width, height, range(DRAWS))
    limits = (40, 20, 136, 92)  # int(0.4 * free) for free = 100, 50, 340, 230
    for side, limit in enumerate(limits):
        values = grown[:, side]
        assert np.array_equal(values, values.round())  # whole pixels
        assert set(values.astype(int)) == set(range(limit + 1))  # exactly 0..limit
        assert values.mean() == pytest.approx(limit / 2, abs=4 * limit / np.sqrt(12 * DRAWS))


def positions(sampler, box, width, height, seeds):
    """Per draw: the square's position along the long axis, its inset, and the range of
    positions and the largest inset the public code allows for that draw's grown box."""
    rows = []
    for seed in seeds:
        g = sampler(box, width, height, random.Random(seed))
        (ex0, ey0, ex1, ey1), (cx0, cy0, cx1, cy1) = g.mask_box, g.crop
        inset = cy0  # landscape: the square spans the height, less the inset
        left = cx0 - inset
        first, last = max(ex1 - height, 0), min(ex0 + height, width) - height
        margin = min(ey0, ex0 - left, left + height - ex1, height - ey1)
        rows.append((left, inset, first, last, int(0.6 * margin), cx1 - cx0, cy1 - cy0))
    return np.array(rows, dtype=float)


def test_original_square_is_the_short_side_at_a_uniform_position_with_a_uniform_inset():
    rows = positions(CropSampler(mode="original"), (200, 100, 330, 300), 800, 480, range(DRAWS))
    left, inset, first, last, most, width, height = rows.T
    assert np.array_equal(width, height) and np.array_equal(width, 480 - 2 * inset)
    assert np.array_equal(left, left.round()) and np.array_equal(inset, inset.round())
    assert (left >= first).all() and (left <= last).all() and (inset <= most).all()
    # Uniform over the whole range: the position's fraction of its range, and the inset's of
    # its maximum, average one half and reach both ends.
    where = (left - first) / (last - first)
    assert where.mean() == pytest.approx(0.5, abs=0.015) and where.min() == 0 and where.max() == 1
    share = inset[most > 0] / most[most > 0]
    assert share.mean() == pytest.approx(0.5, abs=0.015) and share.min() == 0 and share.max() == 1
    # The public code's inset is at most 60% of the margin, so the side is never below...
    assert height.min() >= 480 - 2 * most.max()


def test_portrait_images_slide_the_square_down():
    sampler = CropSampler(mode="original")
    for seed in range(200):
        g = sampler((100, 300, 300, 500), 480, 800, random.Random(seed))
        cx0, cy0, cx1, cy1 = g.crop
        assert cx1 - cx0 == cy1 - cy0 == 480 - 2 * cx0  # the width, less the inset
        ex0, ey0, ex1, ey1 = g.mask_box
        assert cx0 <= ex0 and cy0 <= ey0 and cx1 >= ex1 and cy1 >= ey1


def test_square_images_are_used_whole_without_an_inset():
    sampler = CropSampler(mode="original")
    crops = {sampler((100, 120, 300, 260), 500, 500, random.Random(s)).crop for s in range(500)}
    assert crops == {(0.0, 0.0, 500.0, 500.0)}


@pytest.mark.parametrize(
    "box, width, height",
    [
        ((10, 40, 600, 400), 640, 480),  # wider than the short side: no square holds it
        ((40, 10, 400, 600), 480, 640),  # taller than the short side, portrait
        ((0, 100, 200, 300), 640, 480),  # at the left edge: only one square position fits
        ((440, 100, 640, 300), 640, 480),  # at the right edge
    ],
)
def test_the_whole_image_is_used_when_fewer_than_two_square_positions_fit(box, width, height):
    sampler = CropSampler(mode="original")
    for seed in range(50):
        crop = sampler(box, width, height, random.Random(seed)).crop
        assert crop == (0.0, 0.0, float(width), float(height))


def test_a_squashed_crop_normalises_each_axis_by_its_own_side():
    g = CropSampler(mode="original")((10, 40, 600, 400), 640, 480, random.Random(0))
    assert g.crop_size == (640.0, 480.0)
    assert g.in_crop(g.object_box) == pytest.approx((10 / 640, 40 / 480, 600 / 640, 400 / 480))


def test_our_sampler_stays_a_switch_of_continuous_fractions():
    sampler = CropSampler(mode="ours")
    grown = growth(sampler, (100, 50, 300, 250), 640, 480, range(2000))
    assert not np.array_equal(grown, grown.round())  # fractions of pixels
    sides = {
        round(sampler((100, 50, 300, 250), 640, 480, random.Random(s)).crop_size[0], 6)
        for s in range(200)
    }
    assert len(sides) > 100  # the side itself is drawn


def test_an_unknown_mode_names_the_setting():
    with pytest.raises(ValueError, match="data.crop.mode"):
        CropSampler(mode="paper")


def test_box_filter_keeps_2_to_80_percent_boxes():
    f = BoxFilter()
    assert f.accepts((0, 0, 20, 20), 100, 100)  # 4%
    assert not f.accepts((0, 0, 10, 10), 100, 100)  # 1%
    assert not f.accepts((0, 0, 95, 95), 100, 100)  # 90%
    assert not f.accepts((50, 50, 40, 60), 100, 100)  # reversed
    # Wider than the short side: the public code keeps it (the image is squashed) ...
    assert f.accepts((0, 0, 150, 20), 200, 100)
    # ... and our former filter, which refused it, is a switch.
    assert not BoxFilter(require_square=True).accepts((0, 0, 150, 20), 200, 100)


@pytest.mark.parametrize("mode", ["original", "ours"])
@pytest.mark.parametrize("seed", range(50))
def test_geometry_invariants(mode, seed):
    rng = random.Random(seed)
    width, height = rng.randint(64, 400), rng.randint(64, 400)
    w = rng.uniform(0.15, 0.9) * min(width, height)
    h = rng.uniform(0.15, 0.9) * min(width, height)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    box = (x0, y0, x0 + w, y0 + h)
    g = CropSampler(mode=mode)(box, width, height, rng)
    ox0, oy0, ox1, oy1 = g.object_box
    ex0, ey0, ex1, ey1 = g.mask_box
    cx0, cy0, cx1, cy1 = g.crop
    eps = 1e-6
    assert ox0 <= x0 + eps and oy0 <= y0 + eps and ox1 > box[2] - 1 and oy1 > box[3] - 1
    assert ex0 <= ox0 + eps and ey0 <= oy0 + eps and ex1 >= ox1 - eps and ey1 >= oy1 - eps
    squashed = g.crop == (0.0, 0.0, float(width), float(height))
    assert squashed or cx1 - cx0 == pytest.approx(cy1 - cy0)  # square
    assert cx0 <= ex0 + eps and cy0 <= ey0 + eps and cx1 >= ex1 - eps and cy1 >= ey1 - eps
    assert cx0 >= -eps and cy0 >= -eps and cx1 <= width + eps and cy1 <= height + eps
    # The reference is the box, padded, clipped to the image.
    rx0, ry0, rx1, ry1 = g.reference_box
    assert rx0 <= ox0 and rx1 >= ox1 and rx0 >= 0 and rx1 <= width
    assert rx0 >= ox0 - 10 - eps


def test_choose_box_returns_none_when_nothing_passes():
    rng = random.Random(0)
    assert choose_box([(0, 0, 1, 1)], 100, 100, BoxFilter(), rng) is None
    assert choose_box([(0, 0, 1, 1), (10, 10, 60, 60)], 100, 100, BoxFilter(), rng) == (
        10,
        10,
        60,
        60,
    )


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["original", "ours"])
def test_sample_reference_comes_from_the_chosen_box_and_mask_covers_it(mode):
    # A grey scene with one pure red object: the reference must be (nearly) all red and
    # the object box must sit inside the hole's rectangle in crop coordinates.
    image = np.full((200, 300, 3), 128, np.uint8)
    image[60:140, 100:180] = (255, 0, 0)
    record = {"png": png(image), "json": json.dumps({"boxes": [[100, 60, 180, 140]]}).encode()}
    sampler = CropSampler(mode=mode, reference_pad=0)
    spec = SampleSpec(resolution=64, reference_size=32, crop_sampler=sampler)
    for seed in range(10):
        sample = make_sample(record, spec, random.Random(seed))
        assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.uint8
        reference = sample["reference"].float()
        assert sample["reference"].shape == (3, 32, 32)
        assert reference[0].mean() > 240 and reference[1:].mean() < 15
        ox0, oy0, ox1, oy1 = sample["object_box"].tolist()
        mx0, my0, mx1, my1 = sample["mask_box"].tolist()
        assert mx0 <= ox0 + 1e-5 and my0 <= oy0 + 1e-5 and mx1 >= ox1 - 1e-5 and my1 >= oy1 - 1e-5
        assert mx0 >= 0 and mx1 <= 1 + 1e-5 and my0 >= 0 and my1 <= 1 + 1e-5
        # The object is red inside its box in the crop, too.
        x0, y0, x1, y1 = (round(v * 64) for v in (ox0, oy0, ox1, oy1))
        assert sample["image"][0, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].float().mean() > 240


def test_a_squashed_sample_shows_the_whole_image_in_the_square():
    # The box is wider than the image is tall: the whole 300x100 image, squashed to 64x64.
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, :150] = (255, 0, 0)  # the left half is red
    record = {"png": png(image), "json": json.dumps({"boxes": [[20, 10, 280, 90]]}).encode()}
    spec = SampleSpec(resolution=64, reference_size=32, crop_sampler=CropSampler(), max_upscale=8)
    sample = make_sample(record, spec, random.Random(0))
    assert sample["crop_px"].tolist() == [300.0, 100.0]
    red = sample["image"][0].float()
    assert red[:, :30].mean() > 250 and red[:, 34:].mean() < 5  # the halves stay halves
    assert sample["object_box"].tolist() == pytest.approx([20 / 300, 0.1, 280 / 300, 0.9])


def test_samples_carry_the_crop_size_in_source_pixels_and_the_kept_outline_points():
    image = np.full((480, 640, 3), 90, np.uint8)
    record = {"png": png(image), "json": json.dumps({"boxes": [[200, 100, 330, 300]]}).encode()}
    spec = SampleSpec(resolution=64, reference_size=32, crop_sampler=CropSampler())
    sizes = Counter()
    for seed in range(20):
        sample = make_sample(record, spec, random.Random(seed))
        width, height = sample["crop_px"].tolist()
        assert width == height and 480 * 0.4 <= width <= 480
        sizes[width] += 1
        assert sample["outline_keep"].shape == (4, 19) and sample["outline_keep"][:, 0].all()
    assert len(sizes) > 5


def test_a_record_without_usable_boxes_is_skipped_with_its_reason():
    image = np.zeros((100, 100, 3), np.uint8)
    record = {"png": png(image), "json": b'{"boxes": [[0, 0, 2, 2]]}'}
    with pytest.raises(SkipSample) as info:
        make_sample(record, SampleSpec(resolution=64), random.Random(0))
    assert info.value.reason == "no_valid_box"
