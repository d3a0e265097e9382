"""A trained checkpoint painting images of any size: the checkpoint and its resolution, images
-> the model's batch contract, and one photo edited in a square region around its mask.

Used by the command lines ``python -m pbe_lightning.edit`` and ``python evaluate.py``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pbe_lightning.data.masks import mask_from_user_image
from pbe_lightning.images import PixelBox, composite, mask_bounding_box, resize
from pbe_lightning.models.build import load_trained
from pbe_lightning.models.module import PaintByExampleModule

log = logging.getLogger(__name__)
DEFAULT_RESOLUTION = 512
# Painting precision: autocast to a 16-bit type (weights stay float32), or none.
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


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


def painting_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (``fp16``, the public scripts' painting, or ``bf16``) on
    ``device``; nothing for ``fp32``."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def speed_up(module: PaintByExampleModule, channels_last: bool, compile: bool) -> None:
    """Channels-last UNet and VAE (faster convolutions on tensor cores), and/or a compiled UNet
    (in place: parameters and state-dict keys stay the UNet's). Either changes the order of
    float operations, so pixels may differ in the last bits."""
    if channels_last:
        module.unet.to(memory_format=torch.channels_last)
        module.vae.to(memory_format=torch.channels_last)
    if compile:
        module.unet.compile()


# --- images <-> the batch contract ------------------------------------------------------------
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


# --- one photo --------------------------------------------------------------------------------
def edit_region(box: PixelBox, width: int, height: int, min_side: int, context: float) -> PixelBox:
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
