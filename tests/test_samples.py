"""The worker's decode, crop and resize (``make_sample``): fast paths that keep the geometry.

Crops are compared with a float reference: PIL's bilinear box filter (a triangle, as wide as
the scale when shrinking) computed in float64 from the full-resolution pixels, so neither
rounding nor a reduced-scale decode is in it. ``shift`` measures how far a crop sits from it
(least squares on the gradients), in output pixels.
"""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from bench.data_throughput import float_crop  # the benchmark's accuracy reference
from pbe_lightning.data import crop_resize
from pbe_lightning.data.crop_resize import DISPLAY_TENSOR
from pbe_lightning.data.crops import CropGeometry, CropSampler
from pbe_lightning.data.samples import (
    DISPLAY_TRANSPOSE,
    SampleSpec,
    decode_scale,
    make_sample,
    stored_box,
    to_rgb,
)
from tests.helpers.hostile_corpus import STORE_TRANSPOSE, exif

SPEC = SampleSpec()  # 512 px crops, 224 px references


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields, sharp edges and sensor-like noise: what resampling differs on."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.uniform(0, 255, (5, 7, 3)).astype(np.uint8))
    pixels = np.asarray(field.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels[height // 3 : height // 2, width // 4 : width // 2] = (250, 40, 30)
    pixels += rng.normal(0, 6, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def shift(ours: np.ndarray, reference: np.ndarray) -> float:
    """The largest of the x and y offsets of ``ours`` from ``reference``, output pixels."""
    grey, mine = reference.mean(0), ours.astype(np.float64).mean(0)
    gy, gx = (g[2:-2, 2:-2].ravel() for g in np.gradient(grey))
    difference = (mine - grey)[2:-2, 2:-2].ravel()
    offsets, *_ = np.linalg.lstsq(np.stack([gx, gy], 1), difference, rcond=None)
    return float(np.abs(offsets).max())


def mean_abs(ours: torch.Tensor, reference: np.ndarray) -> float:
    return float(np.abs(ours.numpy().astype(np.float64) - reference).mean())


def test_an_rgb_image_is_used_as_it_is_and_other_modes_still_convert():
    rgb = Image.fromarray(photo(32, 24))
    assert to_rgb(rgb) is rgb  # no full-image copy
    keyed = rgb.copy()
    keyed.info["transparency"] = (0, 0, 0)  # a colour key still composites over white
    assert to_rgb(keyed) is not keyed and to_rgb(keyed).mode == "RGB"
    for mode in ("L", "P", "CMYK", "RGBA", "LA", "I"):
        assert to_rgb(rgb.convert(mode)).mode == "RGB"


def test_an_rgb_jpeg_is_neither_converted_nor_copied_whole(monkeypatch):
    calls = []

    def spied(name: str):
        method = getattr(Image.Image, name)

        def spy(self: Image.Image, *args: object, **kwargs: object) -> Image.Image:
            calls.append((name, self.size))
            return method(self, *args, **kwargs)

        return spy

    for name in ("convert", "copy", "transpose"):
        monkeypatch.setattr(Image.Image, name, spied(name))
    data = encoded(photo(800, 600), exif=exif(6))  # shown turned: only the crops turn
    make_sample(record(data, [[100.5, 80.2, 420.7, 390.1]]), SPEC, random.Random(0))
    assert calls == []


# Boxes in a 900x700 image: shrinking 2.4x and 3.5x, near 1:1, enlarging 1.7x, touching the
# edges and starting a fraction of a pixel inside them, odd fractions.
BOXES = [
    ((113.37, 52.81, 1034.2, 973.64), 384),  # partly outside: clipped to the image
    ((60.25, 20.5, 660.25, 620.5), 256),
    ((0.0, 0.0, 700.0, 700.0), 200),
    ((0.3, 0.45, 520.3, 520.45), 512),
    ((251.111, 97.777, 398.5, 244.1), 250),
    ((300.9, 180.3, 420.2, 299.6), 224),
    ((899.0 - 410.6, 699.0 - 390.2, 899.99, 699.7), 224),
    ((40.0, 30.0, 712.0, 702.0), 224),  # a scale of exactly 3: the whole-pixel start is kept
    ((0.0, 0.0, 900.0, 700.0), 256),  # the whole image, squashed (no square holds the hole)
]


@pytest.mark.parametrize("box, size", BOXES)
def test_crops_sit_within_a_fiftieth_of_a_pixel_of_the_float_reference(box, size):
    pixels = photo(900, 700)
    image = Image.fromarray(pixels)
    ours = crop_resize.crop_resize(image, box, size, 1)
    clipped = (max(box[0], 0), max(box[1], 0), min(box[2], 900), min(box[3], 700))
    reference = float_crop(pixels, clipped, size)
    pillow = np.asarray(image.resize((size, size), Image.BILINEAR, box=clipped)).transpose(2, 0, 1)
    assert ours.shape == (3, size, size) and ours.dtype == torch.uint8
    # The kernel's grid sits within 0.02 input px of PIL's (0.02 output px when enlarging);
    # the estimate adds a little noise, and edge pixels repeated where PIL reweights.
    assert shift(ours.numpy(), reference) < 0.03
    assert shift(pillow, reference) < 0.003
    # PIL rounds between its passes: ~0.3 off the float crop on these noisy pixels.
    assert mean_abs(ours, reference) < float(np.abs(pillow - reference).mean()) + 0.05


def test_the_torch_kernel_does_almost_every_crop_and_pil_the_rest_exactly(monkeypatch):
    pixels = photo(900, 700)
    image = Image.fromarray(pixels)
    rng = random.Random(0)
    crops = []
    for _ in range(40):
        side = rng.uniform(150, 690)
        x0, y0 = rng.uniform(0, 900 - side), rng.uniform(0, 700 - side)
        crops.append(((x0, y0, x0 + side, y0 + side), rng.choice((224, 512))))
    planned = [crop_resize.torch_crop_resize(image, box, size) is not None for box, size in crops]
    assert sum(planned) >= 36, sum(planned)
    # Where the kernel cannot sample the box exactly enough, PIL's box resize does it.
    monkeypatch.setattr(crop_resize, "MAX_LEAD", 0)
    monkeypatch.setattr(crop_resize, "ALIGN_TOLERANCE", 0.0)
    for box, size in crops[:5]:
        pillow = image.resize((size, size), Image.BILINEAR, box=box, reducing_gap=None)
        ours = crop_resize.crop_resize(image, box, size, 1).permute(1, 2, 0)
        assert np.array_equal(ours.numpy(), np.asarray(pillow))


@pytest.mark.parametrize("seed", range(200))
def test_axis_plans_put_the_grid_on_pils_and_read_every_pixel_it_reads(seed):
    rng = random.Random(seed)
    length = rng.randint(100, 3000)
    size = rng.choice((64, 224, 512))
    start = rng.uniform(-2, length * 0.6)
    end = rng.uniform(start + 2, length + 2)
    start, end = max(start, 0.0), min(end, float(length))
    plan = crop_resize.axis_plan(start, end, size, length)
    if plan is None:
        return
    first, last, lead, scale = plan
    assert abs(start - scale * lead - first) <= 0.02 * min(scale, 1.0) + 1e-9
    radius = max(scale, 1.0)
    # PIL's taps for the first and last outputs (clipped to the image) lie in [first, last).
    lowest = max(int(start + 0.5 * scale - radius + 0.5), 0)
    highest = min(int(end - 0.5 * scale + radius + 0.5), length)
    assert first <= lowest or first <= 0
    assert highest <= last <= length


def test_stored_boxes_crop_what_the_displayed_image_shows():
    stored = Image.fromarray(photo(50, 30))
    box = (7, 3, 29, 21)
    for turn, display in DISPLAY_TRANSPOSE.items():
        shown = stored.transpose(display)
        inside = stored_box(box, turn, *stored.size)
        region = stored.crop(tuple(int(v) for v in inside)).transpose(display)
        assert np.array_equal(np.asarray(region), np.asarray(shown.crop(box))), turn


def test_display_tensors_turn_as_pil_does():
    stored = photo(7, 5)
    for turn, display in DISPLAY_TRANSPOSE.items():
        shown = np.asarray(Image.fromarray(stored).transpose(display))
        ours = DISPLAY_TENSOR[turn](torch.from_numpy(stored).permute(2, 0, 1)).permute(1, 2, 0)
        assert np.array_equal(ours.numpy(), shown), turn


def record(data: bytes, boxes: list, key: str = "jpg") -> dict:
    return {key: data, "json": json.dumps({"boxes": boxes}).encode()}


@pytest.mark.parametrize("turn", [2, 3, 4, 5, 6, 7, 8])
def test_an_exif_turned_photo_gives_the_upright_photos_sample(turn):
    upright = photo(640, 480, seed=turn)
    boxes = [[150.3, 60.7, 420.9, 330.2]]
    stored = np.asarray(Image.fromarray(upright).transpose(STORE_TRANSPOSE[turn]))
    expected = make_sample(record(encoded(upright, "PNG"), boxes, "png"), SPEC, random.Random(1))
    turned = record(encoded(stored, "PNG", exif=exif(turn)), boxes, "png")
    sample = make_sample(turned, SPEC, random.Random(1))
    assert torch.equal(sample["object_box"], expected["object_box"])
    assert torch.equal(sample["mask_box"], expected["mask_box"])
    for key in ("image", "reference"):
        difference = (sample[key].float() - expected[key].float()).abs()
        # Turned 90 degrees, PIL and the kernel run their two passes the other way round.
        assert difference.mean() < 0.3 and difference.max() <= 4, (key, difference.mean())


def test_a_small_reference_keeps_the_full_resolution_a_large_one_does_not():
    image = Image.open(io.BytesIO(encoded(photo(2400, 1800))))
    geometry = CropSampler()((400, 300, 1400, 1300), 2400, 1800, random.Random(0))
    assert decode_scale(image, geometry, SPEC) >= 2  # crop > 1024 px, reference > 448 px
    small = CropSampler()((400, 300, 700, 600), 2400, 1800, random.Random(0))
    assert decode_scale(image, small, SPEC) == 1  # a 320 px reference needs every pixel
    assert decode_scale(Image.open(io.BytesIO(encoded(photo(40, 30), "PNG"))), geometry, SPEC) == 1


def test_a_squashed_crop_keeps_enough_pixels_along_its_short_side():
    image = Image.open(io.BytesIO(encoded(photo(2400, 1800))))
    whole = CropGeometry(
        (0, 0, 2400, 1800), (0, 0, 2400, 1800), (0, 0, 2400, 1800), (0, 0, 2400, 1800)
    )
    assert decode_scale(image, whole, SPEC) == 2  # 1800 / 4 rows would be fewer than 512


@pytest.mark.parametrize("turn", [1, 6])
def test_a_large_photo_decodes_at_a_reduced_scale_and_still_matches_the_full_photo(
    turn, monkeypatch
):
    upright = Image.fromarray(photo(2400, 1800, seed=3))
    stored = np.asarray(upright.transpose(STORE_TRANSPOSE[turn]) if turn > 1 else upright)
    data = encoded(stored, quality=95, exif=exif(turn))
    scales = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(image, mode, size):
        result = draft(image, mode, size)
        scales.append(image.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    boxes = [[500.5, 350.25, 1650.75, 1500.5]]
    sample = make_sample(record(data, boxes), SPEC, random.Random(2))
    assert scales and scales[0] >= 2
    # The same draws on the full-resolution pixels, as displayed, in float.
    rng = random.Random(2)
    rng.choice(boxes)
    geometry = SPEC.crop_sampler(tuple(boxes[0]), 2400, 1800, rng)
    shown = Image.open(io.BytesIO(data)).convert("RGB")
    full = np.asarray(shown.transpose(DISPLAY_TRANSPOSE[turn]) if turn > 1 else shown)
    for key, box, size in (
        ("image", geometry.crop, 512),
        ("reference", geometry.reference_box, 224),
    ):
        reference = float_crop(full, box, size)
        # Measured: shift < 0.02 px, mean abs difference ~0.47 (DCT scaling), ~0.32 (full).
        assert shift(sample[key].numpy(), reference) < 0.04, key
        assert mean_abs(sample[key], reference) < 0.8, key
