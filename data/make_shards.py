"""Convert detection datasets (OpenImages, COCO, a JSONL folder) to training shards.

    python data/make_shards.py openimages --boxes oidv6-train-annotations-bbox.csv \\
        --images train/ --out shards/oi --workers 8
    python data/make_shards.py coco --annotations instances_train2017.json \\
        --images train2017/ --out shards/coco
    python data/make_shards.py folder --jsonl boxes.jsonl --root photos/ --out shards/mine

Each sample is ``{key}.jpg|png|webp`` (the file's bytes, untouched unless ``--resize``) plus
``{key}.json`` = ``{"boxes": [[x0, y0, x1, y1], ...], "labels": [...], "source": "..."}`` in
absolute pixels of the image **as displayed** (EXIF orientation applied), the contract of
``pbe_lightning.data.samples``. No area filter is applied: the loader filters at read time.

Shards are cut from the source's items in file order (``--maxcount`` each, fewer with
``--maxsize``) before any image is read, so shard i's content does not depend on ``--workers``,
and a rerun skips shards already written with the same content. Missing or unreadable images
are skipped and counted in ``OUT/manifest.json``; use one ``--out`` folder per split.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import re
import shlex
import sys
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageOps
from tqdm import tqdm

# Only the annotation readers: importing them does not import torch (workers start fast).
from pbe_lightning.data.crops import Box
from pbe_lightning.data.sources import Item, coco_items, folder_items, openimages_items

TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
# Formats the loader decodes (samples.IMAGE_KEYS). MPO is how PIL names many camera JPEGs.
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
PROGRESS_DIR = ".progress"


@dataclass(frozen=True)
class Options:
    resize: int | None
    quality: int | None
    box_frame: str  # auto | displayed | stored


class Skip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail)
        self.reason = reason


# ----------------------------------------------------------------------------- one image
@dataclass(frozen=True)
class Header:
    format: str
    size: tuple[int, int]  # as stored
    orientation: int

    @property
    def displayed(self) -> tuple[int, int]:
        w, h = self.size
        return (h, w) if self.orientation in TRANSPOSED_ORIENTATIONS else (w, h)


def read_header(path: str) -> Header:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # corrupt EXIF reads as empty
            with Image.open(path) as image:
                # The loader reads orientation the same way (getexif), so both agree on the
                # displayed frame; for a PNG this may decode it, to find a trailing eXIf chunk.
                value = image.getexif().get(ExifTags.Base.Orientation, 1)
                # Out-of-range values display as stored, in exif_transpose and in the loader.
                orientation = value if isinstance(value, int) and 1 <= value <= 8 else 1
                return Header(image.format or "", image.size, orientation)
    except FileNotFoundError:
        raise Skip("missing_image", path) from None
    except Exception as error:  # PIL raises many types on malformed files; one must not end a run
        raise Skip("bad_image", f"{path}: {error!r}") from None


def orient_point(x: float, y: float, orientation: int, w: int, h: int) -> tuple[float, float]:
    """A point of the stored pixels -> the same point once ``exif_transpose`` has run."""
    return {
        2: (w - x, y),
        3: (w - x, h - y),
        4: (x, h - y),
        5: (y, x),
        6: (h - y, x),
        7: (h - y, w - x),
        8: (y, w - x),
    }.get(orientation, (x, y))


def displayed_boxes(item: Item, header: Header, box_frame: str) -> list[Box]:
    """Annotation boxes -> pixel boxes of the displayed image (unclipped)."""
    frame = box_frame
    if frame == "auto":
        frame = "displayed"
        # A COCO-style size says which frame the annotator saw: stored pixels (tools that
        # ignore EXIF) or displayed ones. Equal sizes are ambiguous: the contract's frame wins.
        if item.annotated_size and tuple(item.annotated_size) != header.displayed:
            if tuple(item.annotated_size) != header.size:
                raise Skip("size_mismatch", f"annotated {item.annotated_size}, file {header.size}")
            frame = "stored"
    w, h = header.size if frame == "stored" else header.displayed
    boxes = []
    for x0, y0, x1, y1 in item.boxes:
        if item.normalized:
            x0, y0, x1, y1 = x0 * w, y0 * h, x1 * w, y1 * h
        if frame == "stored":
            ax, ay = orient_point(x0, y0, header.orientation, w, h)
            bx, by = orient_point(x1, y1, header.orientation, w, h)
            x0, y0, x1, y1 = min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)
        boxes.append((x0, y0, x1, y1))
    return boxes


def clip_boxes(
    boxes: list[Box], labels: tuple[str, ...] | None, size: tuple[int, int]
) -> tuple[list[list[float]], list[str] | None, int]:
    """Clip to the image; drop boxes left empty. Returns boxes, labels, number dropped."""
    w, h = size
    kept, kept_labels = [], []
    for i, box in enumerate(boxes):
        if not all(math.isfinite(v) for v in box):
            continue
        x0, y0, x1, y1 = max(0.0, box[0]), max(0.0, box[1]), min(w, box[2]), min(h, box[3])
        if x1 > x0 and y1 > y0:
            kept.append([round(v, 2) for v in (x0, y0, x1, y1)])
            kept_labels.append(labels[i] if labels else None)
    return kept, (kept_labels if labels else None), len(boxes) - len(kept)


def resized(path: str, header: Header, max_side: int, quality: int) -> tuple[bytes, float, float]:
    """Downscale so the long side is ``max_side``, EXIF orientation baked in (tag dropped)."""
    w, h = header.displayed
    scale = max_side / max(w, h)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    with Image.open(path) as image:
        if image.format == "JPEG":  # decode at the smallest DCT scale still >= target
            stored_target = (
                target[::-1] if header.orientation in TRANSPOSED_ORIENTATIONS else target
            )
            image.draft(image.mode, stored_target)
        icc = image.info.get("icc_profile")
        image = ImageOps.exif_transpose(image)
    fmt = "JPEG" if header.format == "MPO" else header.format
    if image.mode not in ("L", "RGB", "RGBA" if fmt != "JPEG" else "CMYK"):
        # Palette and 1-bit images only resize with NEAREST; every target format takes these.
        alpha = fmt != "JPEG" and ("A" in image.getbands() or "transparency" in image.info)
        image = image.convert("RGBA" if alpha else "RGB")
    image = image.resize(target, Image.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format=fmt, quality=quality, icc_profile=icc)
    return out.getvalue(), target[0] / w, target[1] / h


def convert(item: Item, options: Options) -> tuple[dict[str, bytes], int]:
    """One item -> tar members ``{ext: bytes}`` and the number of boxes dropped; or Skip."""
    if not item.boxes:
        raise Skip("no_boxes", "no annotated boxes")
    header = read_header(item.path)
    ext = EXTENSIONS.get(header.format)
    if ext is None:
        raise Skip("unsupported_format", f"{header.format}: convert it to JPEG, PNG or WebP")
    boxes, labels, dropped = clip_boxes(
        displayed_boxes(item, header, options.box_frame), item.labels, header.displayed
    )
    if not boxes:
        raise Skip("no_boxes", f"all {len(item.boxes)} boxes empty or outside the image")
    try:
        if options.resize and max(header.displayed) > options.resize:
            data, sx, sy = resized(item.path, header, options.resize, options.quality)
            boxes = [[round(v * s, 2) for v, s in zip(b, (sx, sy, sx, sy))] for b in boxes]
        else:
            data = Path(item.path).read_bytes()
    except Exception as error:  # as in read_header: a truncated file fails in many ways
        raise Skip("bad_image", f"{item.path}: {error!r}") from None
    meta = {"boxes": boxes, **({"labels": labels} if labels else {}), "source": item.source}
    return {ext: data, "json": json.dumps(meta).encode()}, dropped


# ----------------------------------------------------------------------------- shards
def fingerprint(items: list[Item], options: Options) -> str:
    """Identifies a shard's intended content, so a rerun with other inputs rewrites it."""
    payload = json.dumps([asdict(options), [astuple(i) for i in items]], default=str)
    return hashlib.sha1(payload.encode()).hexdigest()


def write_shard(out: str, name: str, items: list[Item], options: Options, digest: str) -> dict:
    """Write one whole shard; the tar appears under its final name only once complete."""
    skipped, examples, dropped, samples = Counter(), {}, Counter(), 0
    final, partial = Path(out) / name, Path(out) / f"{name}.partial"
    with tarfile.open(partial, "w") as tar:
        for item in items:
            try:
                members, lost = convert(item, options)
            except Skip as skip:
                skipped[skip.reason] += 1
                examples.setdefault(skip.reason, []).append(f"{item.source}: {skip}")
                continue
            dropped["empty_or_outside"] += lost
            for ext, data in members.items():
                # Fixed metadata: the same inputs give byte-identical shards.
                info = tarfile.TarInfo(f"{item.key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
            samples += 1
    stats = {
        "file": name,
        "samples": samples,
        "bytes": partial.stat().st_size,
        "skipped": dict(skipped),
        "dropped_boxes": {k: v for k, v in dropped.items() if v},
        "skip_examples": {k: v[:3] for k, v in examples.items()},
        "fingerprint": digest,
    }
    write_json_atomic(Path(out, PROGRESS_DIR, f"{name}.json"), stats)
    partial.replace(final)
    return stats


def finished_stats(out: str, name: str, digest: str) -> dict | None:
    try:
        stats = json.loads(Path(out, PROGRESS_DIR, f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    done = (Path(out) / name).is_file() and stats.get("fingerprint") == digest
    return stats if done else None


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def plan_shards(items: Iterable[Item], maxcount: int, maxsize: int | None) -> Iterator[list[Item]]:
    """Cut the item stream into shards before any image is read, so shard i is fixed."""
    chunk, size = [], 0
    for item in items:
        # Estimated from the source file: exact without --resize, an upper bound usually with.
        path = Path(item.path)
        estimate = (path.stat().st_size if path.is_file() else 0) + 2048 if maxsize else 0
        if chunk and (len(chunk) >= maxcount or (maxsize and size + estimate > maxsize)):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += estimate
    if chunk:
        yield chunk


def write_all(args: argparse.Namespace, items: Iterable[Item], options: Options) -> list[dict]:
    """Write every planned shard not already finished, ``args.workers`` processes at a time."""
    out, results, pending = args.out, {}, {}
    progress = tqdm(unit="img", desc=f"{args.source} -> {out}", disable=args.quiet)
    # spawn: the same behaviour on every OS, and no fork of a process that may hold threads.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(args.workers, mp_context=context) if args.workers > 1 else None

    def collect(done: Iterable[Future]) -> None:
        for future in done:
            stats = future.result()
            results[stats["file"]] = stats
            progress.update(pending.pop(future))

    try:
        for index, chunk in enumerate(plan_shards(items, args.maxcount, args.maxsize)):
            name, digest = f"{args.prefix}-{index:06d}.tar", fingerprint(chunk, options)
            stats = finished_stats(out, name, digest)
            if stats is None and pool is None:
                stats = write_shard(out, name, chunk, options, digest)
            if stats is not None:
                results[name] = stats
                progress.update(len(chunk))
                continue
            pending[pool.submit(write_shard, out, name, chunk, options, digest)] = len(chunk)
            while len(pending) >= 2 * args.workers:  # bounded: the source is a stream
                collect(wait(pending, return_when=FIRST_COMPLETED).done)
        collect(wait(pending).done)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        progress.close()
    return [results[k] for k in sorted(results)]


def manifest(args: argparse.Namespace, argv: list[str], shards: list[dict], dropped: Counter):
    def total(field: str) -> dict[str, int]:
        counts = Counter(dropped) if field == "dropped_boxes" else Counter()
        for stats in shards:
            counts.update(stats[field])
        return dict(sorted(counts.items()))

    samples = sum(s["samples"] for s in shards)
    skipped = total("skipped")
    last = f"{len(shards) - 1:06d}"
    return {
        "source": args.source,
        "shards_pattern": f"{args.prefix}-{{000000..{last}}}.tar" if shards else None,
        "shards": [{k: s[k] for k in ("file", "samples", "bytes")} for s in shards],
        "total_samples": samples,
        "total_items": samples + sum(skipped.values()),
        "skipped": skipped,
        "dropped_boxes": total("dropped_boxes"),
        "skip_examples": {
            r: [e for s in shards for e in s["skip_examples"].get(r, [])][:10] for r in skipped
        },
        "args": vars(args),
        "command": "make_shards.py " + shlex.join(argv),
    }


# ----------------------------------------------------------------------------- CLI
def byte_size(text: str) -> int:
    """'500000000', '500M', '1.5G' -> bytes."""
    match = re.fullmatch(r"([\d.]+)\s*([KMG]?)B?", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1000000000 or 1G)")
    return int(float(match[1]) * 1024 ** " KMG".index(match[2] or " "))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument_group("output").add_argument
    add("--out", required=True, help="folder for the shards, manifest.json and .progress/")
    add("--prefix", default="train", help="shard names: PREFIX-000000.tar, ... (default train)")
    add("--maxcount", type=int, default=1000, help="source items per shard (default 1000)")
    add("--maxsize", type=byte_size, help="also cut at about this many bytes, e.g. 1G")
    add("--workers", type=int, default=1, help="processes, each writing whole shards")
    add("--resize", type=int, metavar="MAX_SIDE", help="downscale images longer than this (re-encoded, "
        "EXIF orientation baked in); default: the files' bytes as they are")  # fmt: skip
    add("--quality", type=int, default=95, help="JPEG/WebP quality of --resize")
    add("--box-frame", choices=("auto", "displayed", "stored"), default="auto",
        help="which image the boxes were drawn on: as displayed (EXIF applied) or as stored. "
        "auto: displayed, unless an annotated width/height fits the stored one only")  # fmt: skip
    add("--limit", type=int, help="only the first N source items (a trial run)")
    add("--quiet", action="store_true", help="no progress bar")

    parser = argparse.ArgumentParser(
        prog="make_shards.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True)
    oi = sub.add_parser("openimages", parents=[common], help="OpenImages v6/v7 box CSV")
    oi.add_argument("--boxes", required=True, help="*-annotations-bbox.csv, sorted by ImageID")
    oi.add_argument("--images", required=True, help="folder of {ImageID}.jpg")
    oi.add_argument("--classes", help="class-descriptions CSV: names instead of /m/ ids")
    oi.add_argument("--drop-group-boxes", action="store_true",
                    help="drop IsGroupOf boxes (one box around several objects); default: kept, "
                    "as Paint by Example trained on them")  # fmt: skip
    co = sub.add_parser("coco", parents=[common], help="COCO instances JSON (no crowd boxes)")
    co.add_argument("--annotations", required=True, help="e.g. instances_train2017.json")
    co.add_argument("--images", required=True, help="folder the file_name entries are in")
    fo = sub.add_parser("folder", parents=[common], help="JSONL, one image (or box) per line")
    fo.add_argument("--jsonl", required=True, help='lines {"file": "a.jpg", "boxes": [[x0, y0, '
                    'x1, y1]], "labels": [...]?, "width": W?, "height": H?}')  # fmt: skip
    fo.add_argument("--root", help="folder relative files are in (default: the JSONL's)")
    return parser


def source_items(args: argparse.Namespace, dropped: Counter) -> Iterator[Item]:
    """The subcommand's reader, called with its options."""
    if args.source == "openimages":
        return openimages_items(
            args.boxes,
            args.images,
            classes=args.classes,
            keep_group_boxes=not args.drop_group_boxes,
            dropped=dropped,
        )
    if args.source == "coco":
        return coco_items(args.annotations, args.images, dropped=dropped)
    return folder_items(args.jsonl, args.root)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.maxcount < 1 or args.workers < 1:
        raise SystemExit("--maxcount and --workers must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dropped: Counter = Counter()
    items: Iterable[Item] = source_items(args, dropped)
    if args.limit is not None:
        items = (item for _, item in zip(range(args.limit), items))
    options = Options(args.resize, args.quality if args.resize else None, args.box_frame)
    shards = write_all(args, items, options)
    result = manifest(args, argv, shards, dropped)
    write_json_atomic(out / "manifest.json", result)
    stale = {p.name for p in out.glob(f"{args.prefix}-*.tar")} - {s["file"] for s in shards}
    if stale:  # left by a run with other settings; a glob would still pick them up
        print(
            f"warning: {len(stale)} shards not in this plan: {sorted(stale)[:3]}", file=sys.stderr
        )
    total, skipped = result["total_samples"], result["skipped"] or "none"
    print(f"{total} samples in {len(shards)} shards in {out}, skipped: {skipped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
