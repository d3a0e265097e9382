"""Image files <-> tensors, in one place: reading, user masks, resizing, compositing, writing,
and the grid of panels (one row per sample) that sample images, contact sheets and evaluation
grids are drawn with.

Tensors are float ``(1, C, H, W)`` (or batches ``(B, C, H, W)``) in [0, 1]. User mask files are
white = edit, and stay so here; the model's masks (1 = keep) are made from them at the batch
boundary (:func:`pbe_lightning.data.masks.mask_from_user_image`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from torchvision import utils as tv_utils

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
LABEL_HEIGHT = 14  # px above a grid's panels for the column names
PixelBox = tuple[int, int, int, int]  # x0, y0, x1, y1 in whole pixels, end exclusive


# --- reading --------------------------------------------------------------------------------
def image_files(folder: str | Path) -> list[Path]:
    """The images in ``folder`` (by suffix), sorted; none is an error."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def read_image(path: str | Path, upright: bool = False) -> torch.Tensor:
    """RGB file -> ``(1, 3, H, W)`` in [0, 1]; ``upright``: as displayed (EXIF orientation
    applied), which is how users draw their masks on phone photos."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no image at {path}")
    with Image.open(path) as image:
        shown = ImageOps.exif_transpose(image) if upright else image
        pixels = np.asarray(shown.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255


def read_user_mask(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """White = edit mask file -> ``(1, 1, H, W)`` in [0, 1] (still white = edit); checks it.

    ``size`` is the ``(width, height)`` of the image it belongs to."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no mask at {path}")
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if size is not None and image.size != tuple(size):
            raise ValueError(
                f"mask {path} is {image.size[0]}x{image.size[1]} but its image is "
                f"{size[0]}x{size[1]}: masks must have the image's size"
            )
        pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255
    mask = torch.from_numpy(pixels.copy())[None, None]
    if not (mask > 0.5).any():
        raise ValueError(f"mask {path} has no white (edit) pixel: nothing to paint")
    return mask


# --- geometry and compositing ---------------------------------------------------------------
def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` in [0, 1] to ``size`` = (height, width); bicubic, clamped."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size, mode="bicubic", antialias=True).clamp(0, 1)


def centre_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size``, centre crop: CLIP's preprocessing, and how FID sets are
    usually prepared."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    image = resize(image, (max(size, round(height * scale)), max(size, round(width * scale))))
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    return image[..., top : top + size, left : left + size]


def composite(
    source: torch.Tensor, edited: torch.Tensor, user_mask: torch.Tensor, feather: float = 0.0
) -> torch.Tensor:
    """``edited`` inside the mask, ``source`` outside; feathering only fades inwards, so no
    pixel outside the mask ever changes."""
    alpha = (user_mask > 0.5).float()
    if feather > 0:
        as_image = Image.fromarray((alpha[0, 0].numpy() * 255).astype(np.uint8))
        blurred = np.asarray(as_image.filter(ImageFilter.GaussianBlur(feather)), np.float32)
        alpha = alpha * torch.from_numpy(blurred / 255)[None, None]
    return source * (1 - alpha) + edited * alpha


# --- writing --------------------------------------------------------------------------------
def to_pil(image: torch.Tensor) -> Image.Image:
    """``(1, 3, H, W)`` or ``(3, H, W)`` in [0, 1] -> 8-bit RGB."""
    pixels = (image.reshape(-1, *image.shape[-2:]).float().cpu().clamp(0, 1) * 255).round()
    return Image.fromarray(pixels.byte().permute(1, 2, 0).numpy())


def save_atomically(image: torch.Tensor, path: str | Path) -> None:
    """A crash never leaves a half-written file under ``path``: resumable runs trust them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    to_pil(image).save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    os.replace(tmp, path)


# --- grids of panels ------------------------------------------------------------------------
def panel_grid(
    rows: Sequence[Sequence[torch.Tensor]],
    size: int | tuple[int, int] | None = None,
    mode: str = "bicubic",
    antialias: bool = True,
    padding: int = 2,
    labels: Sequence[str] | None = None,
) -> torch.Tensor:
    """One row per sample, one column per panel: ``(3, H', W')`` on the CPU, in [0, 1].

    A panel is ``(C, H, W)`` or ``(1, C, H, W)``, C = 3 or 1 (a mask: shown grey); ``size``
    (an int: square) is the panel size, panels of another size are resized with ``mode``
    (``antialias`` as ``F.interpolate`` takes it); without it, all panels must share one size.
    Panels are laid out ``padding`` px apart on black, every row as long as the first;
    ``labels`` (one per column) are written above them, so a saved PNG explains itself.
    """
    if not rows:
        raise ValueError("a grid needs at least one row")
    if isinstance(size, int):
        size = (size, size)
    tiles = []
    for row in rows:
        if len(row) != len(rows[0]):
            raise ValueError(f"rows of {len(rows[0])} and {len(row)} panels in one grid")
        for panel in row:
            panel = panel.reshape(-1, *panel.shape[-3:]).float()
            if size is not None and tuple(panel.shape[-2:]) != tuple(size):
                panel = F.interpolate(panel, size, mode=mode, antialias=antialias)
            tiles.append(panel.cpu().expand(-1, 3, -1, -1)[0])
    grid = torch.stack(tiles).clamp(0, 1)
    grid = tv_utils.make_grid(grid, nrow=len(rows[0]), padding=padding)
    if labels is None:
        return grid
    if len(labels) != len(rows[0]):
        raise ValueError(f"{len(labels)} labels for {len(rows[0])} columns")
    return torch.cat([column_labels(labels, tiles[0].shape[-1], padding), grid], dim=1)


def column_labels(labels: Sequence[str], width: int, padding: int) -> torch.Tensor:
    """A ``(3, LABEL_HEIGHT, W)`` strip naming each column of a grid of ``width``-px panels:
    white text on black, centred, cut to fit (PIL's built-in font: no font file needed)."""
    step = width + padding
    strip = Image.new("RGB", (padding + step * len(labels), LABEL_HEIGHT))
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
    for column, label in enumerate(labels):
        while label and draw.textlength(label, font=font) > width:
            label = label[:-1]
        left = padding + column * step + (width - draw.textlength(label, font=font)) / 2
        draw.text((left, 2), label, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255


def batch_rows(*columns: torch.Tensor) -> list[list[torch.Tensor]]:
    """Batches ``(B, C, H, W)``, one per column -> the rows of :func:`panel_grid`."""
    return [list(row) for row in zip(*columns, strict=True)]


def save_grid(grid: torch.Tensor, path: str | Path) -> None:
    """A grid from :func:`panel_grid` as PNG (torchvision's 8-bit rounding), folders made."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tv_utils.save_image(grid, path)


# --- masks --------------------------------------------------------------------------------
def mask_bounding_box(mask: torch.Tensor | np.ndarray | Image.Image) -> PixelBox:
    """Box of a user-convention mask (white = edit), end exclusive.

    ``(H, W)`` or channel-first ``(C, H, W)``, floats in [0, 1] or 0-255, or a PIL image."""
    if isinstance(mask, Image.Image):
        mask = mask.convert("L")
    values = mask.detach().cpu() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    values = np.asarray(values, dtype=np.float64)
    if values.max() > 1:
        values = values / 255
    edit = values.reshape(-1, *values.shape[-2:]).max(0) > 0.5  # any channel
    rows, cols = np.flatnonzero(edit.any(1)), np.flatnonzero(edit.any(0))
    if not len(rows):
        raise ValueError("the mask has no white (edit) pixel")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
