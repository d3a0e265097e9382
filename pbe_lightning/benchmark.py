"""Reading a COCOEE benchmark folder in either layout, detected from what the folder holds.

- **released**: COCOEE as its authors distribute it: ``GT_3500/<id>_GT.png`` (the 512x512
  source), ``Ref_3500/<id>_ref.png`` (the reference crop) and ``Mask_bbox_3500/<id>_mask.png``
  (white = edit), ids zero-padded to 12 digits. Items are the ids of ``GT_3500``, sorted.
- **ours**: ``manifest.json`` + ``source/``, ``mask/``, ``reference/`` from
  ``data/make_cocoee.py``, in the manifest's order.

Either way an :class:`Item` is one edit to paint, named by its id. A manifest may also record
each item's ground truth (``truth``: the exemplar's object colour, shape and background, the
distractor colours, the hole lying on background) with the shapes' silhouettes (``shapes``),
as the toy benchmark of ``python -m pbe_lightning.demo.benchmark`` does: evaluate.py then
scores exemplar following and leakage (``metrics.exemplar``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pbe_lightning.images import read_image, read_user_mask
from pbe_lightning.metrics.exemplar import ExemplarTruth
from pbe_lightning.metrics.scores import KnownEdit

RELEASED = {"source": "GT_3500", "reference": "Ref_3500", "mask": "Mask_bbox_3500"}
RELEASED_SUFFIX = {"source": "_GT.png", "reference": "_ref.png", "mask": "_mask.png"}
RELEASED_ID = re.compile(r"^(\d{12})_GT\.png$")


@dataclass(frozen=True)
class Item:
    index: int  # position in the benchmark's order: the seed and the chunk follow from it
    id: str
    source: Path
    mask: Path
    reference: Path
    category: str
    truth: ExemplarTruth | None = None  # the manifest's ground truth, where it records one


def benchmark_layout(root: Path) -> str:
    """``"ours"`` or ``"released"``; an error saying what a benchmark folder holds otherwise."""
    if (root / "manifest.json").is_file():
        return "ours"
    if all((root / folder).is_dir() for folder in RELEASED.values()):
        return "released"
    hint = ""
    if root.is_dir():
        inside = [p for p in sorted(root.iterdir()) if p.is_dir()]
        nested = [p for p in inside if (p / RELEASED["source"]).is_dir()]
        if nested:
            hint = f" (did you mean benchmark={nested[0]}?)"
    raise FileNotFoundError(
        f"benchmark={root} is not a COCOEE folder{hint}: expected the released layout "
        f"({', '.join(f'{f}/' for f in RELEASED.values())}) or manifest.json from "
        "data/make_cocoee.py"
    )


def read_items(benchmark: str | Path, limit: int | None = None) -> list[Item]:
    """The benchmark's items in order (the first ``limit`` of them)."""
    root = Path(benchmark)
    if benchmark_layout(root) == "released":
        return released_items(root)[:limit]
    entries = json.loads((root / "manifest.json").read_text())["items"][:limit]
    paths = [[root / e[key] for key in ("source", "mask", "reference")] for e in entries]
    return [
        Item(i, str(e["id"]), *p, str(e.get("category", "")), item_truth(e))
        for i, (e, p) in enumerate(zip(entries, paths))
    ]


def item_truth(entry: dict) -> ExemplarTruth | None:
    truth = entry.get("truth")
    try:
        return ExemplarTruth.from_manifest(truth) if truth is not None else None
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"benchmark item {entry.get('id')}: its 'truth' is malformed ({error!r}); it needs "
            "colour, distractor_colours and exemplar_background (RGB in [0, 1]): rewrite the "
            "benchmark"
        ) from None


def silhouettes(benchmark: str | Path) -> dict[str, torch.Tensor] | None:
    """The shapes' silhouettes ``{name: (H, W) in [0, 1]}`` a manifest names (``shapes``),
    for shape following; None when it names none (or the layout is the released one)."""
    root = Path(benchmark)
    if benchmark_layout(root) != "ours":
        return None
    shapes = json.loads((root / "manifest.json").read_text()).get("shapes") or {}
    return {name: read_image(root / path)[0, 0] for name, path in shapes.items()} or None


def released_items(root: Path) -> list[Item]:
    """Items of the released layout: every ``GT_3500/<12-digit id>_GT.png``, sorted by id,
    each with its reference and mask; a missing one is an error naming the files."""
    ids = sorted(
        match[1]
        for path in (root / RELEASED["source"]).iterdir()
        if (match := RELEASED_ID.match(path.name))
    )
    if not ids:
        raise FileNotFoundError(
            f"no <12-digit id>_GT.png in {root / RELEASED['source']}: is this COCOEE as released?"
        )
    items, missing = [], []
    for index, item_id in enumerate(ids):
        paths = {
            role: root / folder / f"{item_id}{RELEASED_SUFFIX[role]}"
            for role, folder in RELEASED.items()
        }
        missing += [str(p.relative_to(root)) for p in paths.values() if not p.is_file()]
        items.append(Item(index, item_id, paths["source"], paths["mask"], paths["reference"], ""))
    if missing:
        raise FileNotFoundError(
            f"benchmark={root}: {len(missing)} files of its {len(ids)} items are missing, e.g. "
            f"{', '.join(missing[:3])}: re-extract the released COCOEE"
        )
    return items


def known_edit(item: Item, edit: torch.Tensor) -> KnownEdit | None:
    """The item's ground truth for scoring ``edit``: the hole lies on background, so the
    source's pixels there are the truth behind it."""
    if item.truth is None:
        return None
    source = read_image(item.source)[0]
    hole = read_user_mask(item.mask, (source.shape[-1], source.shape[-2]))[0, 0] > 0.5
    if edit.shape[-2:] != source.shape[-2:]:
        raise ValueError(
            f"edit of item {item.id} is {tuple(edit.shape[-2:])}, its source "
            f"{tuple(source.shape[-2:])}: the edits folder holds other edits; evaluate anew"
        )
    return KnownEdit(item.truth, source, hole)
