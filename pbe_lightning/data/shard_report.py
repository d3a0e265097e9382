"""Look at shards before training on them: counts, skips, boxes, sizes, and a contact sheet.

    python -m pbe_lightning.data.shard_report '/data/train-{000000..000099}.tar' --samples 16 \\
        --out contact.png --mask paper --augment paper --max-records 2000

SHARDS takes what ``data.shards`` takes (brace patterns, globs, several arguments). Every record
goes through the training code (``make_sample``), so the skip counts are the ones training
would log. The contact sheet shows random usable samples as the model gets them: the worker
crop, then ``device_transform`` with the mask and augmentation built from the real config files
(``conf/data/mask/*.yaml``, ``conf/data/augment/*.yaml``) by Hydra. One row per sample:
source | mask (white = edit) | masked source | augmented reference.

The config tree is ``--config-dir``, else ``./conf`` in the current directory, else the
checkout's ``conf/`` next to the package (absent when the package is installed elsewhere).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import default_collate

from pbe_lightning.data.crops import BoxFilter
from pbe_lightning.data.datamodule import check_local_shards, device_transform, expand_urls
from pbe_lightning.data.device_decode import decode_batch, is_encoded
from pbe_lightning.data.ledger import SkipLedger
from pbe_lightning.data.samples import (
    IMAGE_KEYS,
    SKIP_REASONS,
    SampleSpec,
    SkipSample,
    displayed_size,
    make_sample,
    open_image,
    orientation,
    parse_boxes,
    usable_boxes,
)
from pbe_lightning.data.stream import error_message, shard_reader
from pbe_lightning.images import batch_rows, panel_grid, save_grid

CHECKOUT_CONF = Path(__file__).resolve().parents[2] / "conf"  # a git checkout's config tree
CONFIG_MARKER = Path("data") / "webdataset.yaml"  # what a usable config tree holds
COLUMNS = "source | mask (white = edit) | masked source | augmented reference"
COLUMN_LABELS = ("source", "mask", "masked", "reference")  # above the contact sheet's columns


@dataclass
class Stats:
    """What one pass over the records saw."""

    records_per_shard: dict[str, int] = field(default_factory=dict)
    skips: Counter = field(default_factory=Counter)
    usable: int = 0
    formats: Counter = field(default_factory=Counter)
    rotated: int = 0  # EXIF orientation other than 1
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    boxes_per_image: list[int] = field(default_factory=list)
    area_fractions: list[float] = field(default_factory=list)
    aspects: list[float] = field(default_factory=list)  # width / height
    in_area_range: int = 0
    accepted: int = 0  # area in range and fits a square crop: what training can pick
    images_with_accepted: int = 0

    @property
    def records(self) -> int:
        return sum(self.records_per_shard.values())


@dataclass
class Reservoir:
    """A uniform random choice of ``size`` items from a stream of unknown length."""

    size: int
    rng: random.Random
    items: list = field(default_factory=list)
    seen: int = 0

    def offer(self, item: object) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        elif (slot := self.rng.randrange(self.seen)) < self.size:
            self.items[slot] = item


def find_config_dir(config_dir: str | Path | None = None) -> Path:
    """``config_dir`` if given, else ``./conf``, else the checkout's; each must hold the data
    group (``data/webdataset.yaml``). Raises FileNotFoundError naming ``--config-dir``."""
    if config_dir is not None:
        if not (Path(config_dir) / CONFIG_MARKER).is_file():
            raise FileNotFoundError(
                f"--config-dir {config_dir} has no {CONFIG_MARKER}: pass the repository's conf/"
            )
        return Path(config_dir).resolve()
    for candidate in (Path.cwd() / "conf", CHECKOUT_CONF):
        if (candidate / CONFIG_MARKER).is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"no config tree (conf/{CONFIG_MARKER.as_posix()}) in the current directory or next to "
        "the package: pass --config-dir /path/to/pbe-lightning/conf"
    )


def load_data_config(
    mask: str,
    augment: str,
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
) -> DictConfig:
    """The ``data`` config group as training composes it, with these mask/augment choices,
    from the config tree ``config_dir`` (default: :func:`find_config_dir`'s search)."""
    config_dir = find_config_dir(config_dir)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(
            "data/webdataset",
            overrides=[f"data/mask={mask}", f"data/augment={augment}", *overrides],
        )
    return cfg.data


def read_records(
    urls: list[str], stats: Stats, limit: int | None, ledger: SkipLedger
) -> Iterator[dict]:
    """Records of each shard in order; a corrupt or empty shard is counted (as training does)."""
    for url in urls:
        if limit is not None and stats.records >= limit:
            return
        errors: list[Exception] = []
        stats.records_per_shard[url] = 0
        for record in shard_reader(url, errors):
            if limit is not None and stats.records >= limit:
                return
            stats.records_per_shard[url] += 1
            yield record
        if errors:
            stats.skips["corrupt_shard"] += 1
            ledger.write(url, "-", "corrupt_shard", error_message(errors[0]))
        elif not stats.records_per_shard[url]:
            stats.skips["empty_shard"] += 1
            ledger.write(url, "-", "empty_shard", "a tar without records")


def note_header_and_boxes(record: dict, stats: Stats, spec: SampleSpec) -> None:
    """Size, format and box statistics from the json and the image header (nothing decoded)."""
    image_key = next((k for k in IMAGE_KEYS if k in record), None)
    try:
        boxes = parse_boxes(record.get("json"), spec)
        image = open_image(record.get(image_key) if image_key else None, spec)
        turn = orientation(image)
    except SkipSample:
        return
    width, height = displayed_size(image, turn)
    stats.formats[image.format] += 1
    stats.rotated += turn != 1
    stats.widths.append(width)
    stats.heights.append(height)
    real = usable_boxes(boxes, width, height)
    stats.boxes_per_image.append(len(real))
    accepted = 0
    for box in real:
        x0, y0, x1, y1 = box
        fraction = (x1 - x0) * (y1 - y0) / (width * height)
        stats.area_fractions.append(fraction)
        stats.aspects.append((x1 - x0) / (y1 - y0))
        stats.in_area_range += spec.box_filter.min_area <= fraction <= spec.box_filter.max_area
        accepted += spec.box_filter.accepts(box, width, height)
    stats.accepted += accepted
    stats.images_with_accepted += accepted > 0


def scan(
    urls: list[str],
    spec: SampleSpec,
    samples: int,
    limit: int | None,
    seed: int,
    ledger: SkipLedger | None = None,
) -> tuple[Stats, list[dict]]:
    """One pass: statistics of every record, and a random few usable samples."""
    stats = Stats()
    chosen = Reservoir(samples, random.Random(f"inspect:{seed}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a broken record is counted below, not warned about
        ledger = ledger or SkipLedger(None)
        for index, record in enumerate(read_records(urls, stats, limit, ledger)):
            note_header_and_boxes(record, stats, spec)
            try:
                sample = make_sample(record, spec, random.Random(f"sample:{seed}:{index}"))
            except SkipSample as skip:
                stats.skips[skip.reason] += 1
                ledger.write(
                    record.get("__url__", "?"), record.get("__key__"), skip.reason, str(skip)
                )
                continue
            stats.usable += 1
            chosen.offer(sample)
    return stats, chosen.items


def model_view(samples: list[dict], cfg: DictConfig, spec: SampleSpec, seed: int) -> dict:
    """The batch the model would get from these samples (training mode: augmented)."""
    batch = default_collate(samples)
    if is_encoded(batch):
        batch = decode_batch(batch, spec.resolution, spec.reference_size)
    torch.manual_seed(seed)  # the augmentation and the masks draw from the global generator
    return device_transform(batch, instantiate(cfg.mask), instantiate(cfg.augment), True)


def contact_sheet(batch: dict, tile: int) -> torch.Tensor:
    """One row per sample, [0, 1]: source, hole (white), masked source, augmented reference."""
    source = batch["image"] * 0.5 + 0.5
    hole = 1 - batch["mask"]
    masked = batch["masked_image"] * 0.5 + 0.5
    rows = batch_rows(*(x.float().cpu() for x in (source, hole, masked, batch["reference"])))
    return panel_grid(rows, tile, mode="bilinear", antialias=True, labels=COLUMN_LABELS)


def spread(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    if not values:
        return "n/a"
    quantiles = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    parts = [
        ("min", min(values)),
        ("p10", quantiles[0]),
        ("median", statistics.median(values)),
        ("p90", quantiles[-1]),
        ("max", max(values)),
    ]
    return "  ".join(f"{name} {fmt.format(v)}" for name, v in parts)


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def report(stats: Stats, box_filter: BoxFilter) -> str:
    lines = [f"shards: {len(stats.records_per_shard)}"]
    width = max((len(u) for u in stats.records_per_shard), default=0)
    lines += [f"  {u:<{width}}  {n} records" for u, n in stats.records_per_shard.items()]
    skipped = sum(stats.skips.values()) - stats.skips["corrupt_shard"]
    lines += [
        f"records: {stats.records} total, {stats.usable} usable, {skipped} skipped",
        "skipped by reason:",
        *(f"  {reason:<15} {stats.skips[reason]}" for reason in SKIP_REASONS),
    ]
    formats = ", ".join(f"{k} {v}" for k, v in stats.formats.most_common()) or "none"
    lines += [
        f"images (readable headers): {len(stats.widths)}; formats: {formats}; "
        f"EXIF-rotated: {stats.rotated}",
        f"  width   {spread(stats.widths, '{:.0f}')}",
        f"  height  {spread(stats.heights, '{:.0f}')}",
        f"  short   {spread([min(w, h) for w, h in zip(stats.widths, stats.heights)], '{:.0f}')}",
    ]
    boxes = len(stats.area_fractions)
    low, high = box_filter.min_area, box_filter.max_area
    lines += [
        f"boxes: {boxes} in {len(stats.boxes_per_image)} images",
        f"  per image      {spread(stats.boxes_per_image, '{:.0f}')}",
        f"  area fraction  {spread(stats.area_fractions)}",
        f"  aspect (w/h)   {spread(stats.aspects)}",
        f"  area in [{low:g}, {high:g}]: {stats.in_area_range} ({percent(stats.in_area_range, boxes)})",
        f"  accepted (area and fits a square crop): {stats.accepted} "
        f"({percent(stats.accepted, boxes)}); images with one: {stats.images_with_accepted} "
        f"({percent(stats.images_with_accepted, len(stats.boxes_per_image))})",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pbe_lightning.data.shard_report",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("shards", nargs="+", help="brace pattern, glob, or several paths")
    parser.add_argument("--samples", type=int, default=16, help="rows of the contact sheet")
    parser.add_argument("--out", default="contact.png", help="contact sheet PNG ('' for none)")
    parser.add_argument("--resolution", type=int, help="crop size (default: the config's)")
    parser.add_argument("--reference-size", type=int, help="reference size (config's)")
    parser.add_argument("--mask", default="paper", help="conf/data/mask/<name>.yaml")
    parser.add_argument("--augment", default="paper", help="conf/data/augment/<name>.yaml")
    parser.add_argument("--max-records", type=int, help="stop after this many records")
    parser.add_argument("--tile", type=int, default=256, help="panel size in the sheet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--config-dir", help="the config tree (default: ./conf, else the checkout's conf/)"
    )
    parser.add_argument(
        "--ledger", help="write every skipped record and shard here (training's ledger format)"
    )
    parser.add_argument(
        "--decode-on-device", action="store_true", help="show the data.decode_on_device path"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override of the data group, e.g. data.box_filter.min_area=0.05",
    )
    return parser.parse_args(argv)


def build_spec(cfg: DictConfig, args: argparse.Namespace) -> SampleSpec:
    return SampleSpec(
        resolution=args.resolution or cfg.resolution,
        reference_size=args.reference_size or cfg.reference_size,
        box_filter=instantiate(cfg.box_filter),
        crop_sampler=instantiate(cfg.crop),
        max_upscale=cfg.max_upscale,
        decode_on_device=args.decode_on_device,
        max_json_bytes=cfg.max_json_bytes,
        max_boxes=cfg.max_boxes,
    )


def main(argv: Sequence[str] | None = None) -> Stats:
    args = parse_args(argv)
    try:
        config_dir = find_config_dir(args.config_dir)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    cfg = load_data_config(args.mask, args.augment, args.override, config_dir)
    spec = build_spec(cfg, args)
    urls = expand_urls(args.shards)
    check_local_shards(urls, "SHARDS")
    if args.ledger:
        Path(args.ledger).unlink(missing_ok=True)  # this pass's skips, not an older one's
    ledger = SkipLedger(args.ledger)
    shown = args.samples if args.out else 0
    stats, samples = scan(urls, spec, shown, args.max_records, args.seed, ledger)
    ledger.close()
    print(report(stats, spec.box_filter))
    if args.ledger:
        print(f"skip ledger: {args.ledger} ({sum(stats.skips.values())} lines)")
    if args.out and samples:
        sheet = contact_sheet(model_view(samples, cfg, spec, args.seed), args.tile)
        save_grid(sheet, args.out)
        print(
            f"contact sheet: {args.out} ({len(samples)} samples, mask={args.mask}, "
            f"augment={args.augment}; columns: {COLUMNS})"
        )
    elif args.out:
        print("contact sheet: none written (no usable sample)")
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
