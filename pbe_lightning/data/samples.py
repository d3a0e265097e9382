"""One shard record (raw bytes) -> one training sample (small uint8 tensors), in a loader worker.

The worker does the least it can: parse the boxes, draw the crop geometry, decode the JPEG at
the largest DCT scale both crops allow (PIL ``draft``), in its stored orientation, and crop and
resize with torch's uint8 antialiased kernel on PIL's fractional-box geometry (``crop_resize.axis_plan``);
only the small crops are turned as EXIF says. Masks and reference augmentation are batched on
the accelerator later (``device_transform``).

With ``SampleSpec.decode_on_device`` the worker stops before decoding: it passes the JPEG's
bytes and the crop geometry in full-image pixels, and ``pbe_lightning.data.device_decode``
decodes, crops and resizes the whole batch on the accelerator (see ``Encoded``).

Box convention: boxes are absolute pixels ``[x0, y0, x1, y1]`` of the image **as displayed**,
i.e. after its EXIF orientation is applied. Converters in ``data/make_shards.py`` write them so.

Records are untrusted: every way a record can be broken ends in ``SkipSample(reason)`` (counted
by the stream), never in another exception that would kill a loader worker. Only the image and
json members are read; other members (``.pyd``, ``.pickle``, ``.pth``, ...) are never decoded.
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
from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

from pbe_lightning.data.crop_resize import crop_resize
from pbe_lightning.data.crops import Box, BoxFilter, CropGeometry, CropSampler, choose_box
from pbe_lightning.data.masks import outline_keep_flags

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# PIL sniffs the content, so a ".jpg" member may hold any format PIL knows. Only these parsers
# may run on untrusted bytes (others have a long CVE history, and EPS shells out to Ghostscript).
# A JPEG factory also opens multi-picture JPEGs (MPO) from phones.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# EXIF orientation -> the transpose that displays the stored pixels (as ImageOps.exif_transpose).
DISPLAY_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Orientations 5-8 rotate by 90 degrees: the displayed width is the stored height.
TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
# Transparent pixels hold arbitrary colours; show them as a viewer on a white page would.
ALPHA_BACKGROUND = (255, 255, 255, 255)

# Every reason a record can be skipped; each is counted and logged as data/skipped_<reason>.
# New reasons go at the end: the stream's and DataHealth's count tensors are indexed by position.
SKIP_REASONS = (
    "corrupt_shard",  # the tar is unreadable or cut short (counted by the stream, not here)
    "missing_image",  # no .jpg/.jpeg/.png/.webp member
    "missing_json",  # no .json member
    "bad_image",  # empty, undecodable, truncated, or not a JPEG/PNG/WebP inside
    "bad_json",  # not JSON, or not a JSON object
    "no_valid_box",  # real boxes (or none at all), but none passes the area/fit filter
    "too_small",  # the short side needs more than max_upscale to reach the crop resolution
    "too_large",  # the header declares more pixels than max_pixels (decompression bomb)
    "bad_boxes",  # 'boxes' absent or not a list of 4-number lists, or no box is in the image
    "empty_shard",  # a readable tar without a single record (counted by the stream)
    "json_too_large",  # the .json member is over max_json_bytes (checked before parsing)
    "too_many_boxes",  # more boxes than max_boxes: every read would walk them all
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
    decode_on_device: bool = False  # pass JPEG bytes on; decode the batch on the accelerator
    # Untrusted records are bounded before they cost anything: a json of 1M boxes takes ~10 s
    # and ~300 MB to parse, again every time its shard is drawn.
    max_json_bytes: int = 1 << 20
    max_boxes: int = 1000


class Encoded(bytes):
    """One sample's pixels, still to be produced on the device; bytes, so batches stay cheap.

    ``kind == "jpeg"``: the record's JPEG file, to decode there, show as EXIF ``orientation``
    says, and cut ``crop`` and ``reference_box`` from (full displayed-image pixels, as in
    ``CropGeometry``). ``kind == "pixels"``: a record the device decoder cannot take (PNG,
    WebP, CMYK, a JPEG with data after its end marker), decoded by the worker as usual and
    carried as the raw uint8 ``image`` then ``reference`` (CHW), so a batch never mixes forms.

    Why bytes and not a uint8 tensor: ``default_collate`` keeps bytes as a list (tensors of
    different lengths cannot be stacked), and ``to`` returning ``self`` makes Lightning leave
    it on the host, where ``torchvision.io.decode_jpeg`` wants its input (it would otherwise
    copy each tensor to the GPU, or walk plain bytes one int at a time: ~0.2 s per 100 kB).
    The boxes ride along as Python floats: slicing by them on the device then needs no sync.
    """

    kind: str = "jpeg"
    orientation: int = 1
    crop: Box = (0.0, 0.0, 0.0, 0.0)
    reference_box: Box = (0.0, 0.0, 0.0, 0.0)

    @classmethod
    def jpeg(cls, data: bytes, orientation: int, geometry: CropGeometry) -> Encoded:
        encoded = cls(data)
        encoded.orientation = orientation
        encoded.crop, encoded.reference_box = geometry.crop, geometry.reference_box
        return encoded

    @classmethod
    def pixels(cls, image: torch.Tensor, reference: torch.Tensor) -> Encoded:
        encoded = cls(image.numpy().tobytes() + reference.numpy().tobytes())
        encoded.kind = "pixels"
        return encoded

    def to(self, *args: object, **kwargs: object) -> Encoded:
        return self


def parse_json(raw: bytes | None, max_bytes: int = SampleSpec.max_json_bytes) -> dict:
    if raw is None:
        raise SkipSample("missing_json")
    if len(raw) > max_bytes:
        raise SkipSample(
            "json_too_large", f"{len(raw)} bytes, over data.max_json_bytes={max_bytes}"
        )
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as error:
        # ValueError covers bad syntax and bad UTF-8; RecursionError, deeply nested arrays.
        raise SkipSample("bad_json", str(error)[:200]) from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"expected a JSON object, got {type(meta).__name__}")
    return meta


def parse_boxes(raw: bytes | None, spec: SampleSpec | None = None) -> list[Box]:
    """The record's boxes as floats; their geometry is checked against the image later."""
    spec = spec or SampleSpec()
    boxes = parse_json(raw, spec.max_json_bytes).get("boxes")
    if isinstance(boxes, list) and len(boxes) > spec.max_boxes:
        raise SkipSample("too_many_boxes", f"{len(boxes)}, over data.max_boxes={spec.max_boxes}")
    if not isinstance(boxes, list) or not all(_is_four_numbers(b) for b in boxes):
        raise SkipSample("bad_boxes", "'boxes' must be a list of [x0, y0, x1, y1] number lists")
    return [tuple(_to_float(v) for v in box) for box in boxes]


def _is_four_numbers(box: object) -> bool:
    number = (int, float)
    return (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, number) and not isinstance(v, bool) for v in box)
    )


def _to_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond float range: as unusable as infinity
        return math.inf


def usable_boxes(boxes: list[Box], width: int, height: int) -> list[Box]:
    """Boxes clipped to the image; those that are not a region of it are dropped.

    Reversed boxes (x1 < x0) are dropped, not reordered: they usually mean a converter wrote
    another layout (``[x, y, w, h]``, or y before x), and reordering would point at the wrong
    region (clipping keeps them reversed). Non-finite, empty and wholly-outside boxes go too.
    """
    kept = []
    for x0, y0, x1, y1 in boxes:
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            continue
        clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
        if clipped[2] > clipped[0] and clipped[3] > clipped[1]:
            kept.append(clipped)
    return kept


def open_image(raw: bytes | None, spec: SampleSpec) -> Image.Image:
    """Parse the header only; the pixel count is checked before anything is decoded."""
    if raw is None:
        raise SkipSample("missing_image")
    if not raw:
        raise SkipSample("bad_image", "empty image file")
    try:
        with warnings.catch_warnings():
            # max_pixels below is the bomb guard. PIL also warns about corrupt metadata, which
            # it then ignores as viewers do: one warning per record would flood worker logs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        # PIL refuses a header past twice its own limit before we can look at it.
        raise SkipSample("too_large", str(error)) from None
    except UnidentifiedImageError:
        raise SkipSample("bad_image", "not a readable JPEG, PNG or WebP file") from None
    except Exception as error:
        # Parsers of untrusted bytes raise many types (OSError, SyntaxError, struct.error, ...).
        raise SkipSample("bad_image", f"{type(error).__name__}: {error}") from None
    if image.width * image.height > spec.max_pixels:
        raise SkipSample("too_large", f"{image.width}x{image.height} pixels")
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8), read as ``data/make_shards.py`` reads it (``getexif``)."""
    try:
        with warnings.catch_warnings():
            # PIL reads corrupt EXIF as empty and warns once per record: noise in every worker.
            warnings.simplefilter("ignore", UserWarning)
            value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as error:
        # For a PNG, getexif decodes the pixels to find a trailing eXIf chunk: a broken file
        # fails here. Elsewhere the boxes' frame would be unknown; skip either way.
        raise SkipSample(
            "bad_image", f"reading metadata: {type(error).__name__}: {error}"
        ) from None
    # Out-of-range values display as stored, as in ImageOps.exif_transpose and the converter.
    return value if isinstance(value, int) and value in DISPLAY_TRANSPOSE else 1


def displayed_size(image: Image.Image, turn: int) -> tuple[int, int]:
    if turn in TRANSPOSED_ORIENTATIONS:
        return image.height, image.width
    return image.width, image.height


def decode_rgb(image: Image.Image, scale: int) -> tuple[Image.Image, float]:
    """Decode as RGB in the stored orientation; a JPEG at 1/``scale`` of its size (DCT scaling).

    Returns the image and the factor from full-size pixels to its pixels (exactly 1/scale:
    libjpeg's scaled pixel ``i`` covers full-size pixels ``scale*i`` to ``scale*(i+1)``, even
    where the last one is cut short). A truncated file is skipped, not decoded partially
    (LOAD_TRUNCATED_IMAGES stays off): the missing part would be flat grey, possibly under the
    box.
    """
    width = image.width
    factor = 1.0
    try:
        if scale > 1 and isinstance(image, JpegImagePlugin.JpegImageFile):
            drafted = image.draft("RGB", (width // scale, image.height // scale))
            if drafted is not None:
                factor = 1 / round(width / drafted[1][2])
        image.load()
        return to_rgb(image), factor
    except Exception as error:
        raise SkipSample("bad_image", f"{type(error).__name__}: {error}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as RGB over white; an RGB image without transparency as it is (no copy)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the top 8 bits instead of letting PIL clip to white.
        array = np.asarray(image).astype(np.int64) >> 8
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        background = Image.new("RGBA", image.size, ALPHA_BACKGROUND)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def stored_box(box: Box, turn: int, width: int, height: int) -> Box:
    """A box of the displayed image in the stored image's pixels; ``width``, ``height``: the
    stored size. Cropping there and showing the small result as EXIF ``turn`` says gives the
    displayed image's crop, without transposing the whole image."""
    x0, y0, x1, y1 = box
    return {
        1: box,
        2: (width - x1, y0, width - x0, y1),
        3: (width - x1, height - y1, width - x0, height - y0),
        4: (x0, height - y1, x1, height - y0),
        5: (y0, x0, y1, x1),
        6: (y0, height - x1, y1, height - x0),
        7: (width - y1, height - x1, width - y0, height - x0),
        8: (width - y1, x0, width - y0, x1),
    }[turn]


def scaled(box: Box, factor: float) -> tuple[float, ...]:
    return tuple(v * factor for v in box)


def make_sample(record: dict, spec: SampleSpec, rng: random.Random) -> dict:
    """Shard record -> ``image`` (3,R,R) and ``reference`` (3,S,S) uint8, plus the mask's
    geometry (``mask_geometry``: boxes in the crop, crop size, outline points kept).

    Raises SkipSample with the first reason found, cheapest checks first: json, image header,
    size, boxes against the image, then decoding. With ``spec.decode_on_device`` the sample
    holds ``encoded`` (an ``Encoded``) instead of the two images.
    """
    image_key = next((k for k in IMAGE_KEYS if k in record), None)
    raw = record.get(image_key) if image_key else None
    boxes = parse_boxes(record.get("json"), spec)
    image = open_image(raw, spec)
    turn = orientation(image)
    width, height = displayed_size(image, turn)
    if min(width, height) * spec.max_upscale < spec.resolution:
        raise SkipSample("too_small", f"{width}x{height} px for {spec.resolution} px crops")
    box = _choose(boxes, width, height, spec, rng)
    geometry = spec.crop_sampler(box, width, height, rng)
    in_crop = mask_geometry(geometry)
    if spec.decode_on_device and device_decodable(image, raw):
        return {"encoded": Encoded.jpeg(raw, turn, geometry), **in_crop}
    pixels = _decode_crops(image, geometry, spec, turn)
    if spec.decode_on_device:
        return {"encoded": Encoded.pixels(pixels["image"], pixels["reference"]), **in_crop}
    return {**pixels, **in_crop}


def mask_geometry(geometry: CropGeometry) -> dict[str, torch.Tensor]:
    """What the batched mask generator needs of a sample (``pbe_lightning.data.masks``): the
    boxes normalised to the crop, the crop's size in source pixels (the hole's outline is
    jittered, and its edge softened, in source pixels) and which of the public code's outline
    points it keeps (worked out here: it compares float64 values exactly)."""
    keep = outline_keep_flags(geometry.object_box, geometry.mask_box)
    return {
        "object_box": torch.tensor(geometry.in_crop(geometry.object_box), dtype=torch.float32),
        "mask_box": torch.tensor(geometry.in_crop(geometry.mask_box), dtype=torch.float32),
        "crop_px": torch.tensor(geometry.crop_size, dtype=torch.float32),
        "outline_keep": torch.tensor(keep, dtype=torch.bool),
    }


def device_decodable(image: Image.Image, raw: bytes) -> bool:
    """Whether the batched device decoder can take this file as it is.

    YCbCr and greyscale JPEGs only: nvjpeg's CMYK support is patchy. A file that does not end
    with the JPEG end marker may be truncated, which only a decode would tell, and a device
    batch cannot skip a sample: the worker decodes those (and skips them if truncated).
    """
    is_jpeg = isinstance(image, JpegImagePlugin.JpegImageFile)
    return is_jpeg and image.mode in ("RGB", "L") and raw.endswith(b"\xff\xd9")


def _decode_crops(
    image: Image.Image, geometry: CropGeometry, spec: SampleSpec, turn: int
) -> dict[str, torch.Tensor]:
    width, height = image.size  # stored, full size: decoding at a DCT scale changes image.size
    crop = stored_box(geometry.crop, turn, width, height)
    reference = stored_box(geometry.reference_box, turn, width, height)
    image, factor = decode_rgb(image, decode_scale(image, geometry, spec))
    return {
        "image": crop_resize(image, scaled(crop, factor), spec.resolution, turn),
        "reference": crop_resize(image, scaled(reference, factor), spec.reference_size, turn),
    }


def _choose(boxes: list[Box], width: int, height: int, spec: SampleSpec, rng: random.Random) -> Box:
    real = usable_boxes(boxes, width, height)
    if boxes and not real:
        # Every box is broken (NaN, reversed, empty, outside): an annotation bug, not filtering.
        raise SkipSample("bad_boxes", f"none of {len(boxes)} boxes is a region of {width}x{height}")
    box = choose_box(real, width, height, spec.box_filter, rng)
    if box is None:
        raise SkipSample("no_valid_box", f"none of {len(real)} boxes passes the filter")
    return box


def decode_scale(image: Image.Image, geometry: CropGeometry, spec: SampleSpec) -> int:
    """The largest JPEG DCT scale (1, 2, 4 or 8) at which both crops still have at least their
    output's pixels across: the scene crop ``resolution``, the reference box ``reference_size``
    on its short side. A reference that needs the full resolution gets it. A squashed crop
    (the whole image, not square) counts by its short side."""
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        return 1
    crop_side = min(geometry.crop_size)
    rx0, ry0, rx1, ry1 = geometry.reference_box
    room = min(crop_side / spec.resolution, min(rx1 - rx0, ry1 - ry0) / spec.reference_size)
    return next((s for s in (8, 4, 2) if room >= s), 1)
