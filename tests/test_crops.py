import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pbe_lightning.data.crops import BoxFilter, CropSampler, choose_box
from pbe_lightning.data.samples import SampleSpec, SkipSample, make_sample


def test_box_filter_keeps_2_to_80_percent_boxes_that_fit_a_square():
    f = BoxFilter()
    assert f.accepts((0, 0, 20, 20), 100, 100)  # 4%
    assert not f.accepts((0, 0, 10, 10), 100, 100)  # 1%
    assert not f.accepts((0, 0, 95, 95), 100, 100)  # 90%
    assert not f.accepts((0, 0, 150, 20), 200, 100)  # wider than the short side
    assert not f.accepts((50, 50, 40, 60), 100, 100)  # reversed


@pytest.mark.parametrize("seed", range(50))
def test_geometry_invariants(seed):
    rng = random.Random(seed)
    width, height = rng.randint(64, 400), rng.randint(64, 400)
    w = rng.uniform(0.15, 0.9) * min(width, height)
    h = rng.uniform(0.15, 0.9) * min(width, height)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    box = (x0, y0, x0 + w, y0 + h)
    g = CropSampler()(box, width, height, rng)
    ex0, ey0, ex1, ey1 = g.mask_box
    cx0, cy0, cx1, cy1 = g.crop
    eps = 1e-6
    assert ex0 <= x0 + eps and ey0 <= y0 + eps and ex1 >= box[2] - eps and ey1 >= box[3] - eps
    assert cx1 - cx0 == pytest.approx(cy1 - cy0)  # square
    assert cx0 <= ex0 + eps and cy0 <= ey0 + eps and cx1 >= ex1 - eps and cy1 >= ey1 - eps
    assert cx0 >= -eps and cy0 >= -eps and cx1 <= width + eps and cy1 <= height + eps
    # The reference is the box, padded, clipped to the image.
    rx0, ry0, rx1, ry1 = g.reference_box
    assert rx0 <= x0 and rx1 >= box[2] and rx0 >= 0 and rx1 <= width
    assert rx0 >= x0 - 10 - eps


def test_choose_box_returns_none_when_nothing_passes():
    rng = random.Random(0)
    assert choose_box([(0, 0, 1, 1)], 100, 100, BoxFilter(), rng) is None
    assert choose_box([(0, 0, 1, 1), (10, 10, 60, 60)], 100, 100, BoxFilter(), rng) == (
        10,
        10,
        60,
        60,
    )


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sample_reference_comes_from_the_chosen_box_and_mask_covers_it():
    # A grey scene with one pure red object: the reference must be (nearly) all red and
    # the object box must sit inside the hole's rectangle in crop coordinates.
    image = np.full((200, 300, 3), 128, np.uint8)
    image[60:140, 100:180] = (255, 0, 0)
    record = {"png": jpeg(image), "json": json.dumps({"boxes": [[100, 60, 180, 140]]}).encode()}
    spec = SampleSpec(resolution=64, reference_size=32, crop_sampler=CropSampler(reference_pad=0))
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


def test_a_record_without_usable_boxes_is_skipped_with_its_reason():
    image = np.zeros((100, 100, 3), np.uint8)
    record = {"png": jpeg(image), "json": b'{"boxes": [[0, 0, 2, 2]]}'}
    with pytest.raises(SkipSample) as info:
        make_sample(record, SampleSpec(resolution=64), random.Random(0))
    assert info.value.reason == "no_valid_box"
