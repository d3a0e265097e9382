"""Small COCOEE benchmarks in the released layout, real PNGs, and a folder of real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pbe_lightning.demo.dataset import demo_scene


def released_benchmark(root: Path, count: int, size: int = 72) -> Path:
    """``GT_3500/<id>_GT.png`` (square scenes), ``Ref_3500/<id>_ref.png`` (crops of other
    scenes), ``Mask_bbox_3500/<id>_mask.png`` (a white box), ids zero-padded to 12 digits."""
    folders = {name: root / name for name in ("GT_3500", "Ref_3500", "Mask_bbox_3500")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for k in range(count):
        item_id = f"{1000 + 37 * k:012d}"
        scene = demo_scene(np.random.default_rng([4, k]), size)[0]
        scene.save(folders["GT_3500"] / f"{item_id}_GT.png")
        other = demo_scene(np.random.default_rng([6, k]), 96)[0]
        other.crop((10 + k % 7, 20, 60 + k % 11, 80)).save(
            folders["Ref_3500"] / f"{item_id}_ref.png"
        )
        mask = Image.new("L", (size, size))
        mask.paste(255, (8 + k % 9, 12, 40 + k % 13, 50))
        mask.save(folders["Mask_bbox_3500"] / f"{item_id}_mask.png")
    return root


def real_images(root: Path, count: int = 8, size: int = 72) -> Path:
    """The FID reference folder: ``count`` demo scenes."""
    root.mkdir(parents=True)
    for i in range(count):
        demo_scene(np.random.default_rng([9, i]), size)[0].save(root / f"{i}.png")
    return root
