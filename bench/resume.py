"""Time to the first batch of a resumed training stream, at 0, 100k and 1M consumed records.

    python -m bench.resume                   # ~2-3 min on 2 cores (the 1M replay is most of it)
    python -m bench.resume --positions 0 10000 --rounds 3

Generates (once, cached under ``$TMPDIR/pbe-bench-resume``) shards of real demo records
(128 px JPEG scenes with boxes, ~10 kB each, 1000 per shard). Then, for each position, one
stream reads that many raw records without decoding them, which is what a resume cost before
streams could seek (the *replay* column), and keeps the state a checkpoint would save there.
Each round then builds a resumed ``TrainStream`` from every saved state in turn and times its
first batch (seek + decode of one batch): medians of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds

from pbe_lightning.data.datamodule import expand_urls
from pbe_lightning.data.samples import SKIP_REASONS, SampleSpec
from pbe_lightning.data.stream import StreamPosition, TrainStream
from pbe_lightning.demo.dataset import ensure_demo_dataset

SHARDS, PER_SHARD = 16, 1000
SPEC = SampleSpec(resolution=64, reference_size=64)
BATCH, BUFFER, SEED = 16, 256, 0


def write_shards(root: Path) -> list[str]:
    """Demo records under fresh keys: 16 shards of 1000 (the demo itself has 1024 records)."""
    demo = ensure_demo_dataset(root / "demo")
    records = [
        r
        for url in expand_urls(str(demo / "train-*.tar"))
        for r in wds.WebDataset(url, shardshuffle=False)
    ]
    done = root / f"shards-{SHARDS}x{PER_SHARD}.complete"
    urls = [str(root / f"bench-{shard:04d}.tar") for shard in range(SHARDS)]
    if not done.exists():
        for shard, url in enumerate(urls):
            with wds.TarWriter(url) as sink:
                for member in range(PER_SHARD):
                    record = records[(shard * PER_SHARD + member) % len(records)]
                    key = f"s{shard:04d}m{member:05d}"
                    sink.write({"__key__": key, "jpg": record["jpg"], "json": record["json"]})
        done.touch()
    return urls


def stream(urls: list[str], position: StreamPosition | None = None) -> TrainStream:
    return TrainStream(urls, SPEC, BATCH, SEED, BUFFER, position=position or StreamPosition())


def replay(urls: list[str], records: int) -> tuple[dict | None, float]:
    """Read ``records`` raw records as training would have (no decode); the state there."""
    if records == 0:
        return None, 0.0
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    source = stream(urls).source(0, 1, skipped)
    start = time.perf_counter()
    for _ in islice(source, records):
        pass
    seconds = time.perf_counter() - start
    return {**source.state(), "records": records}, seconds


def first_batch_seconds(urls: list[str], state: dict | None) -> float:
    position = StreamPosition(1, (state,)) if state else StreamPosition()
    start = time.perf_counter()
    batch = next(iter(stream(urls, position)))
    seconds = time.perf_counter() - start
    assert batch["image"].shape[0] == BATCH
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[0, 100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "pbe-bench-resume"
    urls = write_shards(root)
    states, replays = {}, {}
    for records in args.positions:
        states[records], replays[records] = replay(urls, records)
        print(f"replayed {records} records in {replays[records]:.2f} s", flush=True)
    times: dict[int, list[float]] = {records: [] for records in args.positions}
    for _ in range(args.rounds):
        for records in args.positions:
            times[records].append(first_batch_seconds(urls, states[records]))
    medians = {records: statistics.median(t) for records, t in times.items()}
    print(f"\n{SHARDS} shards x {PER_SHARD} records, batch {BATCH}, shuffle buffer {BUFFER}, ")
    print(f"medians of {args.rounds} rounds\n")
    print(
        "| consumed records | replay before the first batch (old resume), s | "
        "first batch after a seek (now), s |"
    )
    print("|---|---|---|")
    for records in args.positions:
        old = replays[records] + medians[args.positions[0]]
        print(f"| {records} | {old:.2f} | {medians[records]:.3f} |")
    first, last = args.positions[0], args.positions[-1]
    print(
        f"\nresume first batch: {first} records {medians[first]:.3f} s, "
        f"{last} records {medians[last]:.3f} s"
    )


if __name__ == "__main__":
    main()
