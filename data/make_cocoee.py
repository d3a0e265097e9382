"""Build a COCOEE-style benchmark from any COCO-format annotation file and its images.

Per item: the source image (copied byte for byte), a mask PNG of the same size that is white
(= edit) exactly on one annotated box, and a reference object cropped from a box of the SAME
category in a DIFFERENT image. Deterministic given ``--seed``.

    python data/make_cocoee.py --annotations instances_val2017.json --images val2017 \\
        --out cocoee --count 3500 --seed 0

Writes ``source/``, ``mask/``, ``reference/`` and ``manifest.json`` under ``--out`` (evaluate.py
reads this layout, and COCOEE as its authors release it: ``GT_3500/``, ``Ref_3500/``,
``Mask_bbox_3500/``). Boxes in the manifest are integer pixels ``[x0, y0, x1, y1]``, end
exclusive (COCO's float boxes are rounded outwards so the mask covers the whole object).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    """One annotated box that may serve as a source box or as a reference object."""

    annotation_id: int
    image_id: int
    file_name: str
    category_id: int
    box: tuple[int, int, int, int]


def pixel_box(bbox: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """COCO ``[x, y, w, h]`` floats -> integer ``(x0, y0, x1, y1)`` covering it, in the image."""
    x, y, w, h = bbox
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    return x0, y0, min(width, math.ceil(x + w)), min(height, math.ceil(y + h))


def candidates(coco: dict, min_area: float = 0.02, max_area: float = 0.8) -> list[Candidate]:
    """Non-crowd boxes covering ``min_area``-``max_area`` of their image, by annotation id."""
    images = {image["id"]: image for image in coco["images"]}
    found = []
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        image = images.get(ann["image_id"])
        if image is None or ann.get("iscrowd", 0):
            continue  # a crowd box spans many objects: neither a clean hole nor a reference
        width, height = image["width"], image["height"]
        box = pixel_box(ann["bbox"], width, height)
        area = (box[2] - box[0]) * (box[3] - box[1]) / (width * height)
        if box[2] > box[0] and box[3] > box[1] and min_area <= area <= max_area:
            found.append(
                Candidate(ann["id"], image["id"], image["file_name"], ann["category_id"], box)
            )
    return found


def choose_items(pool: list[Candidate], count: int, seed: int) -> list[tuple[Candidate, Candidate]]:
    """``count`` (source, reference) pairs: distinct source images, reference of the same
    category from another image. Raises if the pool cannot give ``count`` of them."""
    by_category: dict[int, list[Candidate]] = defaultdict(list)
    for candidate in pool:
        by_category[candidate.category_id].append(candidate)
    rng = random.Random(seed)
    order = list(pool)
    rng.shuffle(order)
    items, used_images = [], set()
    for source in order:
        if source.image_id in used_images:
            continue  # one item per source image, as in COCOEE
        others = [c for c in by_category[source.category_id] if c.image_id != source.image_id]
        if not others:
            continue
        items.append((source, rng.choice(others)))
        used_images.add(source.image_id)
        if len(items) == count:
            return items
    raise ValueError(
        f"only {len(items)} items possible, --count {count} asked: lower --count or widen "
        "--min-area/--max-area"
    )


def write_item(
    index: int, source: Candidate, reference: Candidate, images: Path, out: Path, names: dict
) -> dict:
    item_id = f"{index:06d}"
    suffix = Path(source.file_name).suffix.lower() or ".jpg"
    paths = {
        "source": f"source/{item_id}{suffix}",
        "mask": f"mask/{item_id}.png",
        "reference": f"reference/{item_id}.png",
    }
    shutil.copyfile(images / source.file_name, out / paths["source"])
    with Image.open(images / source.file_name) as image:
        size = image.size  # the file's own size, in case the JSON's width/height disagree
    mask = Image.new("L", size, 0)
    mask.paste(255, source.box)
    mask.save(out / paths["mask"])
    with Image.open(images / reference.file_name) as image:
        # PNG: a JPEG re-encode would add a second round of compression to the reference.
        image.convert("RGB").crop(reference.box).save(out / paths["reference"])
    return {
        "id": item_id,
        **paths,
        "category": names.get(source.category_id, str(source.category_id)),
        "category_id": source.category_id,
        "box": list(source.box),
        "source_image_id": source.image_id,
        "source_file": source.file_name,
        "reference_from": {
            "image_id": reference.image_id,
            "file_name": reference.file_name,
            "annotation_id": reference.annotation_id,
            "box": list(reference.box),
        },
    }


def build_cocoee(
    annotations: str | Path,
    images: str | Path,
    out: str | Path,
    count: int,
    seed: int = 0,
    min_area: float = 0.02,
    max_area: float = 0.8,
) -> dict:
    """Write the benchmark under ``out`` and return its manifest."""
    coco = json.loads(Path(annotations).read_text())
    names = {category["id"]: category["name"] for category in coco.get("categories", [])}
    items = choose_items(candidates(coco, min_area, max_area), count, seed)
    out = Path(out)
    for folder in ("source", "mask", "reference"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    written = [write_item(i, s, r, Path(images), out, names) for i, (s, r) in enumerate(items)]
    manifest = {
        "version": MANIFEST_VERSION,
        "annotations": Path(annotations).name,
        "seed": seed,
        "min_area": min_area,
        "max_area": max_area,
        "items": written,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="COCO instances_*.json")
    parser.add_argument("--images", required=True, help="folder with the annotated images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, default=3500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-area", type=float, default=0.02, help="of the image (paper 2%%)")
    parser.add_argument("--max-area", type=float, default=0.8, help="of the image (paper 80%%)")
    args = parser.parse_args(argv)
    manifest = build_cocoee(
        args.annotations, args.images, args.out, args.count, args.seed, args.min_area, args.max_area
    )
    print(f"wrote {len(manifest['items'])} items to {args.out}")


if __name__ == "__main__":
    main()
