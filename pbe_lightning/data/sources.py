"""Annotation sources for ``data/make_shards.py``: OpenImages CSV, COCO json, a JSONL folder.

Each reader turns a source's annotations into ``Item``s (one image, its boxes and labels)
without touching any image file; the converter reads headers and writes shards. Readers take
files and options as plain arguments; those that leave boxes out count them in ``dropped``
(a ``Counter``) when given one. Importing this module must stay cheap (no torch): converter
worker processes import it.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from pbe_lightning.data.crops import Box

PathArg = str | PathLike[str]


@dataclass(frozen=True)
class Item:
    """One image of the source and its annotations, before the image file is touched."""

    key: str
    path: str
    boxes: tuple[Box, ...]
    labels: tuple[str, ...] | None
    source: str  # "<dataset>:<id>", so a sample can be traced back
    normalized: bool = False  # boxes in 0-1 of the image instead of pixels
    annotated_size: tuple[int, int] | None = None  # (w, h) the annotator saw, when known


class KeyMaker:
    """Tar-safe unique keys: webdataset splits a member name at its first dot."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, name: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", name) or "item"
        key, n = base, 0
        while key in self.seen:
            n += 1
            key = f"{base}_{n}"
        self.seen.add(key)
        return key


def openimages_items(
    boxes_csv: PathArg,
    images: PathArg,
    *,
    classes: PathArg | None = None,
    keep_group_boxes: bool = True,
    dropped: Counter | None = None,
) -> Iterator[Item]:
    """OpenImages v6/v7 box CSV rows of ``{images}/{ImageID}.jpg``, grouped by ImageID (the
    official CSVs are sorted), streamed: 14M rows stay on disk. ``classes``: the
    class-descriptions CSV (display names instead of /m/ ids). IsGroupOf boxes (one box around
    several objects of a class) are kept, as Paint by Example trained on them; with
    ``keep_group_boxes=False`` they are dropped and counted in ``dropped["group_of"]``."""
    dropped = Counter() if dropped is None else dropped
    names = read_class_names(classes) if classes else {}
    keys, images = KeyMaker(), Path(images)
    with open(boxes_csv, newline="") as f:
        rows = csv.DictReader(f)
        current, boxes, labels = None, [], []
        for row in rows:
            if row["ImageID"] != current:
                if current is not None:
                    yield openimages_item(current, boxes, labels, images, keys)
                current, boxes, labels = row["ImageID"], [], []
            if not keep_group_boxes and row.get("IsGroupOf") == "1":
                dropped["group_of"] += 1
                continue
            x0, x1, y0, y1 = (float(row[c]) for c in ("XMin", "XMax", "YMin", "YMax"))
            boxes.append((x0, y0, x1, y1))
            labels.append(names.get(row["LabelName"], row["LabelName"]))
        if current is not None:
            yield openimages_item(current, boxes, labels, images, keys)


def openimages_item(
    image_id: str, boxes: list[Box], labels: list[str], images: Path, keys: KeyMaker
) -> Item:
    if image_id in keys.seen:
        raise SystemExit(
            f"rows of ImageID {image_id} are not contiguous in --boxes: sort the CSV by ImageID, "
            "e.g. (head -1 f.csv; tail -n +2 f.csv | sort) > sorted.csv"
        )
    path = str(images / f"{image_id}.jpg")
    return Item(keys(image_id), path, tuple(boxes), tuple(labels), f"openimages:{image_id}", True)


def read_class_names(path: PathArg) -> dict[str, str]:
    """MID -> display name; v7 files' header row just adds an entry no MID matches."""
    with open(path, newline="") as f:
        return {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}


def coco_items(
    annotations: PathArg, images: PathArg, *, dropped: Counter | None = None
) -> Iterator[Item]:
    """A COCO instances JSON's images (``file_name`` under ``images``); crowd boxes dropped."""
    dropped = Counter() if dropped is None else dropped
    with open(annotations) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    per_image: dict[int, list[dict]] = {}
    for ann in coco.get("annotations", []):
        if ann.get("iscrowd", 0):
            dropped["crowd"] += 1  # a crowd box outlines many objects: not an exemplar
            continue
        per_image.setdefault(ann["image_id"], []).append(ann)
    keys = KeyMaker()
    for image in coco["images"]:
        anns = per_image.get(image["id"], [])
        boxes = tuple((x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns))
        labels = tuple(names.get(a["category_id"], str(a["category_id"])) for a in anns)
        size = (image["width"], image["height"]) if "width" in image else None
        path = str(Path(images) / image["file_name"])
        key = keys(Path(image["file_name"]).stem)
        yield Item(key, path, boxes, labels, f"coco:{image['id']}", annotated_size=size)


def folder_items(jsonl: PathArg, root: PathArg | None = None) -> Iterator[Item]:
    """JSONL lines ``{"file": ..., "boxes": [...]}``, files relative to ``root`` (default: the
    JSONL's folder). Lines naming the same file are merged, so one-box-per-line files work too."""
    root = Path(root) if root else Path(jsonl).parent
    merged: dict[str, dict] = {}
    with open(jsonl) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            entry = folder_line(line, f"{jsonl}:{number}")
            old = merged.setdefault(entry["file"], {**entry, "boxes": [], "labels": []})
            old["boxes"] += entry["boxes"]
            # Labels survive only if every line of the file has them, or they would misalign.
            both = old["labels"] is not None and entry["labels"] is not None
            old["labels"] = old["labels"] + entry["labels"] if both else None
    keys = KeyMaker()
    for file, entry in merged.items():
        key = keys(str(Path(file).with_suffix("")).lstrip("/"))
        boxes, labels = tuple(map(tuple, entry["boxes"])), entry["labels"]
        labels = tuple(labels) if labels is not None else None
        yield Item(key, str(root / file), boxes, labels, f"folder:{file}", False, entry["size"])


def folder_line(line: str, where: str) -> dict:
    """A validated JSONL line; a malformed one stops the run before any shard is written."""
    try:
        entry = json.loads(line)
    except ValueError as error:
        raise SystemExit(f"{where}: not JSON ({error})") from None
    ok = isinstance(entry, dict) and isinstance(entry.get("file"), str) and entry["file"]
    boxes = entry.get("boxes") if ok else None
    if not isinstance(boxes, list) or not all(is_box(b) for b in boxes):
        raise SystemExit(f'{where}: expected {{"file": "a.jpg", "boxes": [[x0, y0, x1, y1]]}}')
    labels = entry.get("labels")
    if labels is not None and len(labels) != len(boxes):
        raise SystemExit(f"{where}: {len(labels)} labels for {len(boxes)} boxes")
    size = (entry["width"], entry["height"]) if "width" in entry and "height" in entry else None
    return {"file": entry["file"], "boxes": boxes, "labels": labels, "size": size}


def is_box(box: object) -> bool:
    numbers = isinstance(box, list) and all(isinstance(v, (int, float)) for v in box)
    return numbers and len(box) == 4 and not any(isinstance(v, bool) for v in box)
