"""Edit one photo with a trained checkpoint: paint the example object into the masked region.

    python -m pbe_lightning.edit --ckpt run/checkpoints/last.ckpt --image photo.jpg \\
        --mask mask.png --example object.jpg --out edited.png [--paste-back]

The mask file is white = edit, the size of the photo. The model sees a square around the mask's
bounding box (plus context), resized to its training resolution; a photo whose mask box does
not fit in a square inside it is used whole, resized (and resized back). Without
``--paste-back`` the output is that region as the model painted it, at the region's size; with
it, the full photo in which only the masked pixels change. Save as PNG to keep the unmasked
pixels exact (JPEG re-encodes all of them).

The helpers here (loading a checkpoint and its resolution, image files <-> batch contract,
atomic writes) are shared with ``pbe_lightning.evaluate``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image, ImageFilter, ImageOps

from pbe_lightning.data.masks import mask_from_user_image
from pbe_lightning.metrics import Box, load_image, mask_bounding_box
from pbe_lightning.models.build import load_trained
from pbe_lightning.models.module import PaintByExampleModule
from pbe_lightning.models.samplers import SAMPLERS

log = logging.getLogger(__name__)
DEFAULT_RESOLUTION = 512


# --- model ------------------------------------------------------------------------------------
def training_resolution(ckpt_path: str | Path) -> int:
    """The resolution the checkpoint's run trained at, else 512, for checkpoints that do not
    record it (``pbe_resolution``): read from the ``config_resolved.yaml`` that train.py writes
    in the run folder holding ``checkpoints/``.
    """
    config = Path(ckpt_path).resolve().parent.parent / "config_resolved.yaml"
    if config.is_file():
        resolution = OmegaConf.select(OmegaConf.load(config), "data.resolution")
        if resolution:
            return int(resolution)
    log.warning("no data.resolution in %s: using %d px", config, DEFAULT_RESOLUTION)
    return DEFAULT_RESOLUTION


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_editor(
    ckpt_path: str | Path, device: torch.device, resolution: int | None = None
) -> tuple[PaintByExampleModule, int]:
    """The trained module on ``device`` and the (checked) square size it paints at."""
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}")
    module = load_trained(str(ckpt_path)).to(device)
    resolution = resolution or module.training_resolution or training_resolution(ckpt_path)
    multiple = module.pixel_multiple()
    if resolution % multiple:
        raise ValueError(f"resolution={resolution} must be a multiple of {multiple} for this model")
    return module, resolution


# --- images <-> the batch contract ------------------------------------------------------------
def read_image(path: str | Path, upright: bool = False) -> torch.Tensor:
    """RGB file -> ``(1, 3, H, W)`` in [0, 1]; ``upright``: as displayed (EXIF orientation
    applied), which is how users draw their masks on phone photos."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no image at {path}")
    if not upright:
        return load_image(path)
    with Image.open(path) as image:
        pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
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


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` in [0, 1] to ``size`` = (height, width); bicubic, clamped."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size, mode="bicubic", antialias=True).clamp(0, 1)


def centre_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size``, centre crop: how FID sets are usually prepared."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    image = resize(image, (max(size, round(height * scale)), max(size, round(width * scale))))
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    return image[..., top : top + size, left : left + size]


def make_batch(
    sources: Sequence[torch.Tensor],
    user_masks: Sequence[torch.Tensor],
    references: Sequence[torch.Tensor],
    resolution: int,
    reference_size: int,
) -> dict[str, torch.Tensor]:
    """Images of any sizes ([0, 1], masks white = edit) -> the model's batch contract."""
    square = (resolution, resolution)
    image = torch.cat([resize(s, square) for s in sources]) * 2 - 1
    # Thresholded after a smooth resize, like the training masks: 1 = keep, 0 = edit.
    mask = mask_from_user_image(torch.cat([resize(m, square) for m in user_masks]))
    reference = torch.cat([resize(r, (reference_size, reference_size)) for r in references])
    return {"image": image, "mask": mask, "masked_image": image * mask, "reference": reference}


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


# --- one photo --------------------------------------------------------------------------------
def edit_region(box: Box, width: int, height: int, min_side: int, context: float) -> Box:
    """A square around ``box`` with ``context`` x its longer side on each side, at least
    ``min_side`` (no needless upscaling), inside the image; the whole image if none fits."""
    x0, y0, x1, y1 = box
    need = max(x1 - x0, y1 - y0)
    side = min(max(round(need * (1 + 2 * context)), min_side), width, height)
    if need > side:
        return 0, 0, width, height
    left = min(max((x0 + x1 - side) // 2, 0), width - side)
    top = min(max((y0 + y1 - side) // 2, 0), height - side)
    return left, top, left + side, top + side


def edit_photo(
    module: PaintByExampleModule,
    resolution: int,
    photo: torch.Tensor,
    user_mask: torch.Tensor,
    example: torch.Tensor,
    steps: int = 50,
    guidance: float = 5.0,
    seed: int = 0,
    sampler: str = "ddim",
    paste_back: bool = False,
    feather: float = 0.0,
    context: float = 0.3,
) -> torch.Tensor:
    """The painted region at its own size, or (``paste_back``) the full photo; ``(1, 3, H, W)``."""
    height, width = photo.shape[-2:]
    x0, y0, x1, y1 = edit_region(
        mask_bounding_box(user_mask[0]), width, height, resolution, context
    )
    crop, crop_mask = photo[..., y0:y1, x0:x1], user_mask[..., y0:y1, x0:x1]
    device = module.device
    batch = make_batch([crop], [crop_mask], [example], resolution, module.encoder.image_size)
    batch = {key: value.to(device) for key, value in batch.items()}
    generator = torch.Generator(device).manual_seed(seed)
    painted = module.paint(batch, steps, guidance, sampler, generator).float().cpu() * 0.5 + 0.5
    painted = resize(painted, (y1 - y0, x1 - x0))
    if not paste_back:
        return painted
    out = photo.clone()
    out[..., y0:y1, x0:x1] = composite(crop, painted, crop_mask, feather)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pbe_lightning.edit", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint from train.py")
    parser.add_argument("--image", required=True, help="the photo to edit")
    parser.add_argument("--mask", required=True, help="white = edit, the photo's size")
    parser.add_argument("--example", required=True, help="an image of the object to paint in")
    parser.add_argument("--out", required=True, help="output file (PNG keeps pixels exact)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    parser.add_argument("--paste-back", action="store_true", help="write the full photo")
    parser.add_argument("--feather", type=float, default=0.0, help="blend radius in px, inwards")
    parser.add_argument("--context", type=float, default=0.3, help="margin / mask box side")
    parser.add_argument("--resolution", type=int, default=None, help="default: the training one")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        photo = read_image(args.image, upright=True)
        user_mask = read_user_mask(args.mask, (photo.shape[-1], photo.shape[-2]))
        example = read_image(args.example, upright=True)
        module, resolution = load_editor(args.ckpt, pick_device(args.device), args.resolution)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    options = ("steps", "guidance", "seed", "sampler", "paste_back", "feather", "context")
    edited = edit_photo(
        module, resolution, photo, user_mask, example, **{k: getattr(args, k) for k in options}
    )
    save_atomically(edited, args.out)
    print(f"wrote {args.out} ({edited.shape[-1]}x{edited.shape[-2]})")


if __name__ == "__main__":
    main()
