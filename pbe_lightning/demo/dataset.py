"""A generated demo dataset: textured scenes with boxed shapes, written as real shards.

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
from PIL import Image, ImageDraw

from pbe_lightning.demo.cache import generate_once

DEMO_VERSION = 2  # v2: completion marked by .complete (generate_once)
SHAPES = ("ellipse", "rectangle", "triangle", "star", "ring")


def demo_shard_pattern(root: str | os.PathLike, shards: int) -> str:
    return str(Path(root) / f"train-{{000000..{shards - 1:06d}}}.tar")


def ensure_demo_dataset(
    root: str | os.PathLike,
    samples: int = 1024,
    per_shard: int = 256,
    size: int = 128,
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
    """One scene: a textured background with 1-3 shapes; boxes are their pixel extents."""
    image = background(rng, size)
    draw = ImageDraw.Draw(image)
    boxes, labels = [], []
    for _ in range(rng.integers(1, 4)):
        side = rng.uniform(0.22, 0.55) * size
        aspect = rng.uniform(0.6, 1.6)
        w, h = side * aspect**0.5, side / aspect**0.5
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        shape = SHAPES[rng.integers(len(SHAPES))]
        draw_shape(draw, shape, (x0, y0, x0 + w, y0 + h), rng)
        boxes.append([round(x0, 1), round(y0, 1), round(x0 + w, 1), round(y0 + h, 1)])
        labels.append(shape)
    return image, {"boxes": boxes, "labels": labels, "source": "demo"}


def background(rng: np.random.Generator, size: int) -> Image.Image:
    ys, xs = np.mgrid[0:size, 0:size] / size
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]
    stripes = np.sin((xs * np.cos(angle + 1) + ys) * rng.uniform(8, 30))[..., None] * 12
    noise = rng.normal(0, 6, (size, size, 3))
    pixels = low * (1 - t) + high * t + stripes + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, rng: np.random.Generator) -> None:
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    outline = tuple(255 - v for v in fill)
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "ellipse":
        draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill, outline=outline, width=2)
        draw.line((x0, cy, x1, cy), fill=outline, width=2)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline)
    elif shape == "star":
        angles = np.linspace(0, 2 * np.pi, 11)[:-1] - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = [(cx + r * rx * np.cos(a), cy + r * ry * np.sin(a)) for r, a in zip(radii, angles)]
        draw.polygon(points, fill=fill, outline=outline)
    else:
        draw.ellipse(box, fill=fill)
        inner = (cx - rx / 2, cy - ry / 2, cx + rx / 2, cy + ry / 2)
        draw.ellipse(inner, fill=outline)
