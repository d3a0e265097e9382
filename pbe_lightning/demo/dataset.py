"""The demo dataset: scenes of the demo world (``world.py``) written as real shards.

Deterministic (same seed, same bytes), generated once into a cache folder, and written in the
shard contract (``{key}.jpg`` + ``{key}.json`` with pixel boxes), so the demo exercises exactly
the loader a real dataset uses.
"""

from __future__ import annotations

import io
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pbe_lightning.demo.cache import generate_once
from pbe_lightning.demo.world import random_scene

# v2: completion marked by .complete (generate_once). v3: the demo world (flat-coloured shapes
# on five kinds of background, colours from the whole RGB cube). v4: larger objects, boxes
# recorded with a margin.
DEMO_VERSION = 4
SCENE_SIZE = 128
# Recorded boxes reach this many pixels past the object on every side, so that a training
# hole (the box, or the public code's outline, which bulges out of it and whose points move by
# up to 5 px) hides the whole object: a sliver of it left in the context would tell the model
# the colour that only the exemplar should tell.
BOX_MARGIN = 4.0


def demo_shard_pattern(root: str | os.PathLike, shards: int) -> str:
    return str(Path(root) / f"train-{{000000..{shards - 1:06d}}}.tar")


def ensure_demo_dataset(
    root: str | os.PathLike,
    samples: int = 2048,
    per_shard: int = 512,
    size: int = SCENE_SIZE,
    seed: int = 0,
) -> Path:
    """Generate the demo shards under ``root`` unless a complete copy is already there.

    Written atomically (``generate_once``), so concurrent DDP ranks or an interrupted run
    never leave a half-written dataset behind.
    """
    return generate_once(
        Path(root),
        partial(write_demo_shards, samples=samples, per_shard=per_shard, size=size, seed=seed),
    )


def write_demo_shards(folder: Path, samples: int, per_shard: int, size: int, seed: int) -> None:
    counts = []
    for shard in range((samples + per_shard - 1) // per_shard):
        first = shard * per_shard
        indices = range(first, min(samples, first + per_shard))
        with wds.TarWriter(str(folder / f"train-{shard:06d}.tar")) as sink:
            for index in indices:
                image, boxes = demo_scene(np.random.default_rng([seed, index]), size)
                sink.write({"__key__": f"demo{index:07d}", "jpg": jpeg_bytes(image), "json": boxes})
        counts.append(len(indices))
    manifest = {"version": DEMO_VERSION, "seed": seed, "size": size, "samples": counts}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def demo_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict]:
    """One scene of the demo world and its record: pixel boxes, shape names as labels."""
    scene = random_scene(rng, size)
    boxes = [padded_box(thing.box, size) for thing in scene.objects]
    labels = [thing.shape for thing in scene.objects]
    return scene.image(), {"boxes": boxes, "labels": labels, "source": "demo"}


def padded_box(box: tuple[float, ...], size: int, margin: float = BOX_MARGIN) -> list[float]:
    """``box`` grown by ``margin`` pixels on every side, inside the ``size`` x ``size`` scene."""
    x0, y0, x1, y1 = box
    grown = (
        max(0.0, x0 - margin),
        max(0.0, y0 - margin),
        min(size, x1 + margin),
        min(size, y1 + margin),
    )
    return [round(v, 1) for v in grown]
