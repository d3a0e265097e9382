"""Decode, orient, crop and resize a batch of JPEGs on the batch's device (``decode_on_device``).

The loader worker then only parses the json and the JPEG header and draws the crop geometry
(``samples.make_sample`` with ``SampleSpec.decode_on_device``); this turns its batch into the
same ``image`` (B,3,R,R) / ``reference`` (B,3,S,S) uint8 tensors the worker would have made,
before ``device_transform`` runs. On CUDA, ``torchvision.io.decode_jpeg`` decodes the whole
list in one nvjpeg call; elsewhere it decodes on the CPU, one image after the other.

Pixels differ a little from the worker path, which decodes at a reduced DCT scale (PIL
``draft``) when the crop shrinks 2x or more: here the full image is decoded. Crop and resize
are PIL's (fractional box, bilinear filter widened when shrinking), so nothing else differs.

EXIF orientation is applied here with flips and transposes (nvjpeg ignores EXIF), from the
value the worker read with PIL, so both paths agree on the displayed frame the boxes live in.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pbe_lightning.data.crop_resize import DISPLAY_TENSOR
from pbe_lightning.data.crops import Box
from pbe_lightning.data.samples import SKIP_REASONS, Encoded

CHUNK_ROWS = 1024
# What a sample carries besides its pixels: a replaced sample takes all of it from its stand-in.
PER_SAMPLE_KEYS = ("object_box", "mask_box", "crop_px", "outline_keep", "mask")

# EXIF orientation -> how to show the stored (C, H, W) pixels; the same transposes as
# samples.DISPLAY_TRANSPOSE (PIL's ROTATE_90 turns counter-clockwise, as torch.rot90 k=1).
DISPLAY: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {1: lambda x: x, **DISPLAY_TENSOR}


def is_encoded(batch: dict) -> bool:
    return "encoded" in batch


def decode_batch(batch: dict, resolution: int, reference_size: int) -> dict:
    """A batch from a ``decode_on_device`` loader -> the worker path's batch, on its device.

    ``encoded`` is replaced by ``image`` and ``reference``; every other key passes through.
    """
    encoded: list[Encoded] = batch["encoded"]
    device = batch["object_box"].device
    images: list[torch.Tensor | None] = [None] * len(encoded)
    references: list[torch.Tensor | None] = [None] * len(encoded)
    jpeg_rows = [i for i, e in enumerate(encoded) if e.kind == "jpeg"]
    decoded = decode_jpegs([encoded[i] for i in jpeg_rows], device)
    for row, full in zip(jpeg_rows, decoded):
        if full is None:
            continue
        item = encoded[row]
        full = DISPLAY[item.orientation](full)
        images[row] = crop_resize(full, item.crop, resolution)
        references[row] = crop_resize(full, item.reference_box, reference_size)
    for row, item in enumerate(encoded):
        if item.kind == "pixels":
            images[row], references[row] = unpack_pixels(item, resolution, reference_size, device)
    out = {k: v for k, v in batch.items() if k != "encoded"}
    replace_failed(images, references, out)
    out["image"], out["reference"] = torch.stack(images), torch.stack(references)
    return out


def decode_jpegs(data: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 (3, H, W) per file on ``device``; None where no decoder could read it.

    nvjpeg fails a whole batched call for one bad file (and may refuse some valid files the
    CPU decoder reads), so a failed call is retried file by file, on the CPU last.
    """
    if not data:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        return list(_decode(tensors, device))
    except RuntimeError:
        pass
    return [_decode_one(t, device) for t in tensors]


def _decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image IO for TorchCodec (not in this stack yet); it
        # still works and warns on every call, i.e. every training step.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _decode_one(tensor: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    for where in dict.fromkeys((device, torch.device("cpu"))):
        try:
            return _decode([tensor], where)[0].to(device)
        except RuntimeError:
            continue
    return None


def crop_resize(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """``box`` (x0, y0, x1, y1 pixels, fractional) of a (3, H, W) uint8 image -> (3, size, size).

    PIL's bilinear resize with a ``box`` (what the worker path runs) as two matrix products
    with banded resampling matrices: the same fractional geometry and antialiasing filter,
    on any device. ``F.interpolate(antialias=True)`` has the filter but only whole-pixel
    crops, which moves noisy images by up to half a pixel (mean abs diff ~2/255, not ~0.2).
    Dense bands cost more flops than gathering the taps but run 1.5-3x faster on a CPU, and
    on a GPU either is a few microseconds.
    """
    columns, column_weights = _taps(box[0], box[2], image.shape[-1], size)
    rows, row_weights = _taps(box[1], box[3], image.shape[-2], size)
    # Only the pixels some tap reads are filtered. Taps are planned on the host, so nothing
    # here waits for the device.
    top, left = int(rows[0, 0]), int(columns[0, 0])
    region = image[:, top : int(rows[-1, -1]) + 1, left : int(columns[-1, -1]) + 1]
    across = _band(columns - left, column_weights, region.shape[-1], image.device).T
    down = _band(rows - top, row_weights, region.shape[-2], image.device)
    # Row chunks bound the float copy: a whole 8192 px crop would be 0.8 GB at once.
    narrow = torch.cat([c.float() @ across for c in region.split(CHUNK_ROWS, dim=-2)], dim=-2)
    out = down @ narrow  # (size, h) @ (3, h, size)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _band(
    index: torch.Tensor, weight: torch.Tensor, length: int, device: torch.device
) -> torch.Tensor:
    """(size, length) resampling matrix from per-output taps, built where it is used."""
    index, weight = index.to(device), weight.to(device)
    outputs = torch.arange(index.shape[0], device=device)[:, None].expand_as(index)
    matrix = torch.zeros(index.shape[0], length, device=device)
    # Accumulate: taps clamped at the image edge repeat an index (with weight 0).
    return matrix.index_put_((outputs, index), weight, accumulate=True)


def _taps(start: float, end: float, length: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices (size, K) and weights (size, K) of each output pixel along one axis.

    PIL's ``precompute_coeffs`` for the bilinear (triangle) filter: output pixel i is centred
    at ``start + (i + 0.5) * scale`` and, when shrinking, the filter widens by the scale.
    """
    scale = (end - start) / size
    widen = max(scale, 1.0)
    taps = 2 * math.ceil(widen) + 1
    centre = start + (torch.arange(size, dtype=torch.float64) + 0.5) * scale
    first = (centre - widen + 0.5).floor().clamp(min=0)
    last = (centre + widen + 0.5).floor().clamp(max=length)  # exclusive
    index = first[:, None] + torch.arange(taps, dtype=torch.float64)
    weight = (1 - ((index - centre[:, None] + 0.5) / widen).abs()).clamp(min=0)
    weight = torch.where(index < last[:, None], weight, 0.0)
    weight = weight / weight.sum(-1, keepdim=True)
    return index.clamp(max=length - 1).long(), weight.float()


def unpack_pixels(
    item: Encoded, resolution: int, reference_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.frombuffer(bytearray(item), dtype=torch.uint8).to(device)
    split = 3 * resolution * resolution
    image = flat[:split].view(3, resolution, resolution)
    reference = flat[split:].view(3, reference_size, reference_size)
    return image, reference


def replace_failed(images: list, references: list, batch: dict) -> None:
    """Fill samples no decoder could read with another sample of the batch, boxes included.

    A device batch cannot shrink (the step expects its batch size) and such files are rare
    (the worker already rejected truncated and malformed ones): repeating a good sample keeps
    the loss honest; the loss of the file is counted as a skipped ``bad_image``.
    """
    failed = [i for i, image in enumerate(images) if image is None]
    if not failed:
        return
    good = [i for i, image in enumerate(images) if image is not None]
    if not good:
        raise RuntimeError(
            f"no JPEG of a batch of {len(images)} could be decoded: the shards may be corrupt; "
            "check them with `python -m pbe_lightning.data.shard_report`, or set "
            "data.decode_on_device=false to decode (and skip bad files) in the loader workers"
        )
    warnings.warn(
        f"{len(failed)} JPEG(s) of the batch could not be decoded on the device; "
        "each was replaced by another sample of the batch",
        stacklevel=3,
    )
    # Copies: the incoming batch's tensors stay as the loader made them.
    for key in PER_SAMPLE_KEYS:
        if key in batch:
            batch[key] = batch[key].clone()
    for i in failed:
        images[i], references[i] = images[good[0]], references[good[0]]
        for key in PER_SAMPLE_KEYS:
            if key in batch:
                batch[key][i] = batch[key][good[0]]
    if "stream_state" in batch:
        counts = list(batch["stream_state"].skipped)
        counts[SKIP_REASONS.index("bad_image")] += len(failed)
        batch["stream_state"] = replace(batch["stream_state"], skipped=tuple(counts))
