"""One shard record (raw bytes) -> one training sample (small uint8 tensors), in a loader worker.

The worker does the least it can: parse the boxes, draw the crop geometry, decode the JPEG at
the smallest DCT scale that still covers the crop (PIL ``draft``), crop and resize. Masks and
reference augmentation are batched on the accelerator later (``device_transform``).

Box convention: boxes are absolute pixels ``[x0, y0, x1, y1]`` of the image **as displayed**,
i.e. after its EXIF orientation is applied. Converters in ``data/make_shards.py`` write them so.
"""

from __future__ import annotations

import io
import json
import math
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

from pbe_lightning.data.crops import BoxFilter, CropGeometry, CropSampler, choose_box, is_finite_box

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
EXIF_ORIENTATION = 0x0112
# Orientations 5-8 rotate by 90 degrees: the displayed width is the stored height.
TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}

# Every reason a record can be skipped; each is counted and logged as data/skipped_<reason>.
SKIP_REASONS = (
    "corrupt_shard",
    "missing_image",
    "missing_json",
    "bad_image",
    "bad_json",
    "no_valid_box",
    "too_small",
    "too_large",
)


class SkipSample(Exception):
    """A record that cannot become a training sample; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class SampleSpec:
    """What a training sample looks like; built from the ``data`` config."""

    resolution: int = 512
    reference_size: int = 224
    box_filter: BoxFilter = field(default_factory=BoxFilter)
    crop_sampler: CropSampler = field(default_factory=CropSampler)
    max_upscale: float = 4.0  # skip images whose short side needs more than this upscaling
    max_pixels: int = 8192 * 8192  # decompression-bomb guard, checked before decoding


def parse_boxes(raw: bytes | None) -> list[tuple[float, float, float, float]]:
    if raw is None:
        raise SkipSample("missing_json")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise SkipSample("bad_json", str(error)) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("boxes"), list):
        raise SkipSample("bad_json", "expected an object with a 'boxes' list")
    return [tuple(float(v) for v in b) for b in meta["boxes"] if is_finite_box(b)]


def open_image(raw: bytes | None, spec: SampleSpec) -> Image.Image:
    if not raw:
        raise SkipSample("missing_image" if raw is None else "bad_image", "empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise SkipSample("bad_image", str(error)) from None
    if image.width * image.height > spec.max_pixels:
        raise SkipSample("too_large", f"{image.width}x{image.height} pixels")
    return image


def displayed_size(image: Image.Image) -> tuple[int, int]:
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation in TRANSPOSED_ORIENTATIONS:
        return image.height, image.width
    return image.width, image.height


def decode_rgb(image: Image.Image, scale_needed: float) -> tuple[Image.Image, float]:
    """Decode as displayed RGB; a JPEG at the smallest DCT scale still >= ``scale_needed``.

    Returns the image and the factor from full-size displayed pixels to its pixels, so a
    crop downscaled 4x from a 4000 px photo decodes about 16x fewer pixels.
    """
    full_width, _ = displayed_size(image)
    if image.format == "JPEG" and scale_needed < 1:
        target = (math.ceil(image.width * scale_needed), math.ceil(image.height * scale_needed))
        image.draft("RGB", target)
    try:
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise SkipSample("bad_image", str(error)) from None
    return image, image.width / full_width


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the top 8 bits instead of letting PIL clip to white.
        array = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    return image.convert("RGB")


def scaled(box: tuple[float, float, float, float], factor: float) -> tuple[float, ...]:
    return tuple(v * factor for v in box)


def make_sample(record: dict, spec: SampleSpec, rng: random.Random) -> dict:
    """Shard record -> ``image`` (3,R,R) and ``reference`` (3,S,S) uint8, boxes in the crop.

    Raises SkipSample with the reason when the record cannot be used.
    """
    image_key = next((k for k in IMAGE_KEYS if k in record), None)
    boxes = parse_boxes(record.get("json"))
    image = open_image(record.get(image_key) if image_key else None, spec)
    width, height = displayed_size(image)
    if min(width, height) * spec.max_upscale < spec.resolution:
        raise SkipSample("too_small", f"{width}x{height} px for {spec.resolution} px crops")
    box = choose_box(boxes, width, height, spec.box_filter, rng)
    if box is None:
        raise SkipSample("no_valid_box", f"none of {len(boxes)} boxes passes the filter")
    geometry = spec.crop_sampler(box, width, height, rng)
    image, factor = decode_rgb(image, _scale_needed(geometry, spec))
    return {
        "image": _crop_resize(image, scaled(geometry.crop, factor), spec.resolution),
        "reference": _crop_resize(
            image, scaled(geometry.reference_box, factor), spec.reference_size
        ),
        "object_box": torch.tensor(geometry.in_crop(geometry.object_box), dtype=torch.float32),
        "mask_box": torch.tensor(geometry.in_crop(geometry.mask_box), dtype=torch.float32),
    }


def _scale_needed(geometry: CropGeometry, spec: SampleSpec) -> float:
    crop_side = geometry.crop[2] - geometry.crop[0]
    rx0, ry0, rx1, ry1 = geometry.reference_box
    reference_side = min(rx1 - rx0, ry1 - ry0)
    return max(spec.resolution / crop_side, spec.reference_size / max(reference_side, 1.0))


def _crop_resize(image: Image.Image, box: tuple[float, ...], size: int) -> torch.Tensor:
    region = image.resize((size, size), Image.BILINEAR, box=box, reducing_gap=None)
    return torch.from_numpy(np.asarray(region).copy()).permute(2, 0, 1)
