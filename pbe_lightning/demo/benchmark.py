"""A toy COCOEE-style benchmark from the demo world, with ground truth for every item.

    python -m pbe_lightning.demo.benchmark --out toy_bench --count 200 --seed 0

Writes the layout ``evaluate.py`` reads (``manifest.json``, ``source/``, ``mask/`` white = edit,
``reference/``), as ``data/make_cocoee.py`` does for COCO, plus what COCO cannot give:

- the hole lies on a free region of the source scene, so the source's pixels there are the
  true background an edit should blend into;
- the exemplar is an object cropped (padded like a training reference) from ANOTHER scene, on
  a flat background whose colour differs from the source's background under the hole, so a
  copy-pasted exemplar shows up as that colour inside the hole;
- ``truth`` per item: the exemplar's object colour and shape, its background colour, and
  ``distractors`` other candidate colours drawn from the same distribution (all candidates
  kept apart and contrasting with both backgrounds), for scores with an exact chance level;
- ``swap``: a second exemplar of the first distractor's colour and another shape, and
  ``red_blue``: a red and a blue exemplar of the item's shape on a light grey page, for swap
  tests (the same scene and hole painted with either exemplar);
- ``shapes/<name>.png``: every shape's silhouette, for shape following.

``pbe_lightning.metrics.exemplar`` scores edits of it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pbe_lightning.demo.world import (
    MIN_CONTRAST,
    SHAPES,
    WorldObject,
    background,
    paint_object,
    place_objects,
    random_box,
    random_colour,
    silhouette,
    to_image,
)

MANIFEST_VERSION = 1
SEPARATION = 0.35  # candidate colours are at least this far apart (RGB in [0, 1])
REFERENCE_PAD = 10  # pixels around the exemplar's object, as the training references
HOLE_SIDES = (0.32, 0.5)  # hole side as a fraction of the scene side
# The red/blue swap pair: saturated red and blue objects on a light grey page, as anyone would
# render a test exemplar; scenes are painted once with each.
RED, BLUE, PAGE = (0.85, 0.1, 0.1), (0.1, 0.2, 0.85), (0.88, 0.88, 0.88)
IMAGES = ("source", "mask", "reference", "swap", "red", "blue")  # one folder each


@dataclass(frozen=True)
class Exemplar:
    pixels: np.ndarray  # the padded crop
    thing: WorldObject  # in crop coordinates
    background: tuple[float, float, float]


def candidate_colours(
    rng: np.random.Generator, count: int, avoid: list[np.ndarray]
) -> list[np.ndarray]:
    """``count`` colours, i.i.d. uniform in the RGB cube given that they are pairwise at least
    ``SEPARATION`` apart and ``MIN_CONTRAST`` from every colour in ``avoid``; the condition is
    the same for every one, so they stay exchangeable (which fixes the chance level)."""
    for _ in range(10_000):
        colours = [random_colour(rng) for _ in range(count)]
        apart = all(
            np.linalg.norm(a - b) >= SEPARATION for i, a in enumerate(colours) for b in colours[:i]
        )
        contrasting = all(np.linalg.norm(c - a) >= MIN_CONTRAST for c in colours for a in avoid)
        if apart and contrasting:
            return colours
    raise RuntimeError(f"no {count} candidate colours apart from {avoid}: lower --distractors")


def exemplar_crop(
    rng: np.random.Generator, size: int, shape: str, colour: np.ndarray, flat: np.ndarray
) -> Exemplar:
    """An object of ``shape`` and ``colour`` on a flat ``flat`` background, cropped padded."""
    pixels, _ = background(rng, size, "flat")
    pixels = np.clip(pixels - pixels.mean((0, 1)) + flat, 0, 1)  # that colour, with its noise
    box = random_box(rng, size, (0.3, 0.5))
    thing = WorldObject(shape, tuple(float(c) for c in colour), box)
    pixels = paint_object(pixels, thing)
    x0, y0, x1, y1 = box
    left, top = max(0, int(x0) - REFERENCE_PAD), max(0, int(y0) - REFERENCE_PAD)
    right = min(size, int(np.ceil(x1)) + REFERENCE_PAD)
    bottom = min(size, int(np.ceil(y1)) + REFERENCE_PAD)
    inside = WorldObject(shape, thing.colour, (x0 - left, y0 - top, x1 - left, y1 - top))
    return Exemplar(pixels[top:bottom, left:right], inside, tuple(float(c) for c in flat))


def hole_box(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    side = rng.uniform(*HOLE_SIDES) * size
    aspect = rng.uniform(0.75, 1.35)
    w, h = round(side * aspect**0.5), round(side / aspect**0.5)
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    return (x0, y0, x0 + w, y0 + h)


def make_item(rng: np.random.Generator, size: int, distractors: int) -> dict:
    """One item's images and truth (arrays, not yet written)."""
    base, kind = background(rng, size)
    hole = hole_box(rng, size)
    source, others = place_objects(rng, base, int(rng.integers(0, 3)), avoid=[hole])
    x0, y0, x1, y1 = hole
    under_hole = base[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    flat = random_colour(rng)
    while np.linalg.norm(flat - under_hole) < MIN_CONTRAST:
        flat = random_colour(rng)
    colours = candidate_colours(rng, distractors + 1, avoid=[under_hole, flat])
    shape = SHAPES[rng.integers(len(SHAPES))]
    swap_shape = SHAPES[rng.integers(len(SHAPES))]
    exemplar = exemplar_crop(rng, size, shape, colours[0], flat)
    swap = exemplar_crop(rng, size, swap_shape, colours[1], flat)
    red = exemplar_crop(rng, size, shape, np.asarray(RED), np.asarray(PAGE))
    blue = exemplar_crop(rng, size, shape, np.asarray(BLUE), np.asarray(PAGE))
    mask = np.zeros((size, size), np.float32)
    mask[y0:y1, x0:x1] = 1
    truth = {
        "colour": rounded(colours[0]),
        "shape": shape,
        "exemplar_background": rounded(flat),
        "distractor_colours": [rounded(c) for c in colours[1:]],
        "hole_box": list(hole),
        "exemplar_box": rounded(exemplar.thing.box, 1),
        "source_background": kind,
        "source_objects": [{"shape": o.shape, "colour": rounded(o.colour)} for o in others],
    }
    swap_truth = {"colour": rounded(colours[1]), "shape": swap_shape}
    return {
        "images": {
            "source": source,
            "mask": mask,
            "reference": exemplar.pixels,
            "swap": swap.pixels,
            "red": red.pixels,
            "blue": blue.pixels,
        },
        "truth": truth,
        "swap": swap_truth,
    }


def rounded(values, digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in values]


def write_benchmark(
    out: str | Path, count: int, seed: int = 0, size: int = 128, distractors: int = 3
) -> dict:
    """Write ``count`` items under ``out`` and return the manifest."""
    out = Path(out)
    for folder in (*IMAGES, "shapes"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for shape in SHAPES:
        template = silhouette(shape, (0, 0, 64, 64), 64)
        to_image(np.repeat(template[..., None], 3, axis=2)).convert("L").save(
            out / "shapes" / f"{shape}.png"
        )
    items = []
    for index in range(count):
        item = make_item(np.random.default_rng([seed, index]), size, distractors)
        item_id = f"{index:06d}"
        paths = {key: f"{key}/{item_id}.png" for key in IMAGES}
        for key, pixels in item["images"].items():
            image = to_image(pixels) if pixels.ndim == 3 else to_image(pixels).convert("L")
            image.save(out / paths[key])
        items.append(
            {
                "id": item_id,
                "source": paths["source"],
                "mask": paths["mask"],
                "reference": paths["reference"],
                "category": item["truth"]["shape"],
                "box": item["truth"]["hole_box"],
                "truth": item["truth"],
                "swap": {"reference": paths["swap"], **item["swap"]},
                "red_blue": {
                    "references": [paths["red"], paths["blue"]],
                    "colours": [list(RED), list(BLUE)],
                },
            }
        )
    manifest = {
        "version": MANIFEST_VERSION,
        "kind": "toy",
        "seed": seed,
        "size": size,
        "distractors": distractors,
        "shapes": {shape: f"shapes/{shape}.png" for shape in SHAPES},
        "chance": {"colour_following": 1 / (distractors + 1), "shape_following": 1 / len(SHAPES)},
        "command": f"python -m pbe_lightning.demo.benchmark --out {out} --count {count} --seed {seed}",
        "items": items,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the benchmark into")
    parser.add_argument("--count", type=int, default=200, help="number of items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="scene side in pixels")
    parser.add_argument(
        "--distractors", type=int, default=3, help="other candidate colours per item"
    )
    args = parser.parse_args(argv)
    manifest = write_benchmark(args.out, args.count, args.seed, args.size, args.distractors)
    print(f"{len(manifest['items'])} items in {args.out}; chance: {manifest['chance']}")


if __name__ == "__main__":
    main()
