"""Decode, orient, crop and resize a batch of JPEGs on the batch's device (``decode_on_device``).

The loader worker then only parses the json and the JPEG header and draws the crop geometry
(``samples.make_sample`` with ``SampleSpec.decode_on_device``); this turns its batch into the
same ``image`` (B,3,R,R) / ``reference`` (B,3,S,S) uint8 tensors the worker would have made,
before ``device_transform`` runs. On CUDA, ``torchvision.io.decode_jpeg`` decodes the whole
list in one nvjpeg call; elsewhere it decodes on the CPU, one image after the other.

Pixels differ a little from the worker path, which decodes at a reduced DCT scale (PIL
``draft``) and resizes with PIL's bilinear filter: here the full image is decoded and each
output pixel averages a grid of bilinear samples over its footprint (``roi_align``, which takes
the fractional crop boxes as they are).

EXIF orientation is applied here with flips and transposes (nvjpeg ignores EXIF), from the
value the worker read with PIL, so both paths agree on the displayed frame the boxes live in.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from pbe_lightning.data.samples import SKIP_REASONS, Encoded

ENCODED_KEYS = ("encoded", "crop_px", "reference_px")

# EXIF orientation -> how to show the stored (C, H, W) pixels; the same transposes as
# samples.DISPLAY_TRANSPOSE (PIL's ROTATE_90 turns counter-clockwise, as torch.rot90 k=1).
DISPLAY: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x,
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, dims=(-2, -1)),
    7: lambda x: torch.rot90(x, 2, dims=(-2, -1)).transpose(-2, -1),
    8: lambda x: torch.rot90(x, 1, dims=(-2, -1)),
}


def is_encoded(batch: dict) -> bool:
    return "encoded" in batch


def decode_batch(batch: dict, resolution: int, reference_size: int) -> dict:
    """A batch from a ``decode_on_device`` loader -> the worker path's batch, on its device.

    ``encoded``, ``crop_px`` and ``reference_px`` are replaced by ``image`` and ``reference``;
    every other key passes through.
    """
    encoded: list[Encoded] = batch["encoded"]
    device = batch["crop_px"].device
    images: list[torch.Tensor | None] = [None] * len(encoded)
    references: list[torch.Tensor | None] = [None] * len(encoded)
    jpeg_rows = [i for i, e in enumerate(encoded) if e.kind == "jpeg"]
    decoded = decode_jpegs([encoded[i] for i in jpeg_rows], device)
    for row, full in zip(jpeg_rows, decoded):
        if full is None:
            continue
        full = DISPLAY[encoded[row].orientation](full)
        images[row] = crop_resize(full, batch["crop_px"][row], resolution)
        references[row] = crop_resize(full, batch["reference_px"][row], reference_size)
    for row, item in enumerate(encoded):
        if item.kind == "pixels":
            images[row], references[row] = unpack_pixels(item, resolution, reference_size, device)
    out = {k: v for k, v in batch.items() if k not in ENCODED_KEYS}
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
    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _decode_one(tensor: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    for where in dict.fromkeys((device, torch.device("cpu"))):
        try:
            return _decode([tensor], where)[0].to(device)
        except RuntimeError:
            continue
    return None


def crop_resize(image: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """The square ``box`` (x0, y0, x1, y1 in pixels, fractional) of (3, H, W) uint8 -> (3, size, size).

    ``sampling_ratio=0`` averages ceil(box side / size)^2 bilinear samples per output pixel:
    an area filter when shrinking (no aliasing), plain bilinear when enlarging.
    """
    rois = torch.cat([box.new_zeros(1), box.to(torch.float32)])[None]
    out = roi_align(
        image[None].float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=0,
        aligned=True,
    )  # fmt: skip
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


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
            "check them with `python -m pbe_lightning.data.inspect`, or set "
            "data.decode_on_device=false to decode (and skip bad files) in the loader workers"
        )
    warnings.warn(
        f"{len(failed)} JPEG(s) of the batch could not be decoded on the device; "
        "each was replaced by another sample of the batch",
        stacklevel=3,
    )
    for i in failed:
        images[i], references[i] = images[good[0]], references[good[0]]
        for key in ("object_box", "mask_box"):
            batch[key][i] = batch[key][good[0]]
    if "skipped" in batch:
        batch["skipped"][SKIP_REASONS.index("bad_image")] += len(failed)
