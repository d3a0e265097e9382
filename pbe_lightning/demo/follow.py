"""Does a trained checkpoint paint the exemplar? Paint the toy benchmark and score it.

    python -m pbe_lightning.demo.benchmark --out toy_bench --count 200 --seed 0
    python -m pbe_lightning.demo.follow --ckpt outputs/train/<date>/checkpoints/last.ckpt \\
        --bench toy_bench [--swap] [--grid toy_grid.png]

Each item is painted with its exemplar (and, with ``--swap``, again with the same noise and its
swap exemplar) through ``pbe_lightning.inference``, as ``evaluate.py`` paints COCOEE, and scored
with ``pbe_lightning.metrics.exemplar``: colour following (chance ``1 / (distractors + 1)``),
shape following (chance ``1 / shapes``), copy-paste leakage, and the swap test. Prints one JSON
summary; ``--out`` also writes it with the per-item scores.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from pbe_lightning.images import panel_grid, read_image, read_user_mask, resize, save_grid
from pbe_lightning.inference import load_editor, make_batch, pick_device
from pbe_lightning.metrics.exemplar import (
    ExemplarTruth,
    ItemScores,
    score_item,
    summarise,
    swap_moves_toward,
)
from pbe_lightning.models.module import PaintByExampleModule


def paint_items(
    module: PaintByExampleModule,
    resolution: int,
    sources: list[torch.Tensor],
    masks: list[torch.Tensor],
    references: list[torch.Tensor],
    steps: int,
    guidance: float,
    seed: int,
) -> list[torch.Tensor]:
    """Edits ``(3, H, W)`` in [0, 1] at each source's size, the edit pasted into the hole."""
    batch = make_batch(sources, masks, references, resolution, module.encoder.image_size)
    batch = {key: value.to(module.device) for key, value in batch.items()}
    generator = torch.Generator(module.device).manual_seed(seed)
    painted = module.paint(batch, steps, guidance, None, generator).float().cpu() * 0.5 + 0.5
    edits = []
    for source, mask, edit in zip(sources, masks, painted):
        edit = resize(edit[None], tuple(source.shape[-2:]))
        hole = (mask > 0.5).float()
        edits.append((source * (1 - hole) + edit * hole)[0])
    return edits


def load_bench(root: Path, limit: int | None) -> tuple[dict, list[dict]]:
    manifest = json.loads((root / "manifest.json").read_text())
    return manifest, manifest["items"][:limit]


def silhouettes(root: Path, manifest: dict) -> dict[str, torch.Tensor]:
    return {name: read_image(root / path)[0, 0] for name, path in manifest["shapes"].items()}


def run(args: argparse.Namespace) -> dict:
    root = Path(args.bench)
    manifest, items = load_bench(root, args.limit)
    module, resolution = load_editor(args.ckpt, pick_device(args.device))
    shapes = silhouettes(root, manifest)
    scores: list[ItemScores] = []
    swaps: list[bool] = []
    red_blue: list[bool] = []
    rows = []
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        sources = [read_image(root / item["source"]) for item in chunk]
        masks = [read_user_mask(root / item["mask"]) for item in chunk]
        references = [read_image(root / item["reference"]) for item in chunk]
        seed = args.seed + start
        paint = (module, resolution, sources, masks)
        edits = paint_items(*paint, references, args.steps, args.guidance, seed)
        for item, source, mask, edit in zip(chunk, sources, masks, edits):
            truth = ExemplarTruth.from_manifest(item["truth"])
            scores.append(score_item(edit, source[0], mask[0, 0] > 0.5, truth, shapes))
        if args.swap:
            others = [read_image(root / item["swap"]["reference"]) for item in chunk]
            swapped = paint_items(*paint, others, args.steps, args.guidance, seed)
            for item, mask, edit, other in zip(chunk, masks, edits, swapped):
                colours = (item["truth"]["colour"], item["swap"]["colour"])
                swaps.append(swap_moves_toward(edit, other, mask[0, 0] > 0.5, *colours))
            pairs = [
                [read_image(root / p) for p in item["red_blue"]["references"]] for item in chunk
            ]
            reds, blues = (
                paint_items(*paint, [pair[k] for pair in pairs], args.steps, args.guidance, seed)
                for k in (0, 1)
            )
            for item, mask, red, blue in zip(chunk, masks, reds, blues):
                colours = item["red_blue"]["colours"]
                red_blue.append(swap_moves_toward(red, blue, mask[0, 0] > 0.5, *colours))
        if len(rows) < args.grid_rows:
            for k, (source, mask, reference, edit) in enumerate(
                zip(sources, masks, references, edits)
            ):
                row = [source, mask.expand(-1, 3, -1, -1), reference, edit[None]]
                if args.swap:  # the same scene, hole and noise with the other exemplar
                    row += [others[k], swapped[k][None]]
                rows.append(row)
    summary = summarise(scores, manifest["distractors"], len(shapes))
    if args.swap:
        summary["swap_moves_toward"] = sum(swaps) / max(1, len(swaps))
        summary["red_blue_moves_toward"] = sum(red_blue) / max(1, len(red_blue))
    summary.update(ckpt=str(args.ckpt), steps=args.steps, guidance=args.guidance, seed=args.seed)
    if args.grid:
        labels = ("source", "hole", "exemplar", "edit")
        if args.swap:
            labels += ("other exemplar", "its edit")
        save_grid(panel_grid(rows[: args.grid_rows], manifest["size"], labels=labels), args.grid)
    if args.out:
        record = {"summary": summary, "items": [asdict(s) for s in scores], "swaps": swaps}
        record["red_blue"] = red_blue
        Path(args.out).write_text(json.dumps(record, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a train.py checkpoint")
    parser.add_argument("--bench", required=True, help="a folder written by demo.benchmark")
    parser.add_argument("--limit", type=int, default=None, help="score the first N items only")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--swap", action="store_true", help="also paint the swap and the red/blue exemplars"
    )
    parser.add_argument("--grid", default=None, help="write a PNG grid of the first items")
    parser.add_argument("--grid-rows", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the summary and per-item scores")
    print(json.dumps(run(parser.parse_args(argv)), indent=1))


if __name__ == "__main__":
    main()
