"""The training sample stream: endless, deterministic, and the same length on every rank.

Each (rank, worker) pair reads its own endless stream: shards drawn with replacement from a
seeded RNG, records shuffled in a seeded buffer, each record turned into a sample with an RNG
seeded by its position. Endless streams cut into fixed-length epochs give every DDP rank the
same number of batches (unequal shards otherwise make the fastest rank hang at epoch end), and
seeding by position makes the stream reproducible.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from pbe_lightning.data.samples import SKIP_REASONS, SampleSpec, SkipSample, make_sample


@dataclass(frozen=True)
class StreamPlace:
    """Where a loader process sits in a DDP run: global rank and world size."""

    rank: int = 0
    world_size: int = 1


class TrainStream(IterableDataset):
    """Yields collated batches (batching in the worker keeps per-sample IPC off the hot path)."""

    def __init__(
        self,
        urls: list[str],
        spec: SampleSpec,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
        place: StreamPlace = StreamPlace(),
    ) -> None:
        self.urls = urls
        self.spec = spec
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.place = place
        # An endless stream of unusable records would otherwise hang training silently.
        self.give_up_after = max(1000, 50 * batch_size)

    def stream_id(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.place.rank * workers + worker, self.place.world_size * workers

    def __iter__(self) -> Iterator[dict]:
        stream, _ = self.stream_id()
        rng = random.Random(f"shards:{self.seed}:{stream}")
        skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        read = 0
        batch: list[dict] = []
        warned: set[str] = set()
        for index, record in enumerate(self.records(rng, skipped)):
            read += 1
            if read > self.give_up_after:
                raise RuntimeError(
                    f"{read} records in a row from {self.urls[:3]}... gave no usable sample "
                    f"(skips by reason: {dict(zip(SKIP_REASONS, skipped.tolist()))}): the data "
                    "is broken; inspect it with `python -m pbe_lightning.data.inspect SHARDS`"
                )
            try:
                sample_rng = random.Random(f"sample:{self.seed}:{stream}:{index}")
                batch.append(make_sample(record, self.spec, sample_rng))
            except SkipSample as skip:
                skipped[SKIP_REASONS.index(skip.reason)] += 1
                warn_first(skip, record, warned)
                continue
            if len(batch) == self.batch_size:
                out = default_collate(batch)
                out["skipped"], out["records_read"] = skipped, torch.tensor(read)
                yield out
                batch, read = [], 0
                skipped = torch.zeros_like(skipped)

    def records(self, rng: random.Random, skipped: torch.Tensor) -> Iterator[dict]:
        def count_corrupt(error: Exception) -> bool:
            skipped[SKIP_REASONS.index("corrupt_shard")] += 1
            if skipped[SKIP_REASONS.index("corrupt_shard")] > self.give_up_after:
                raise RuntimeError(f"every shard read lately is corrupt or unreadable: {error}")
            warnings.warn(f"skipping the rest of a corrupt shard: {error}", stacklevel=2)
            return True

        def shard_urls() -> Iterator[dict]:
            while True:
                yield {"url": rng.choice(self.urls)}

        records = wds.tarfile_to_samples(handler=count_corrupt)(shard_urls())
        return shuffled(records, self.shuffle_buffer, rng)


def shuffled(items: Iterable[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Buffer shuffle: records from one shard spread across batches."""
    buffer: list[dict] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def warn_first(skip: SkipSample, record: dict, warned: set[str]) -> None:
    if skip.reason in warned:
        return
    warned.add(skip.reason)
    where = f"{record.get('__url__', '?')} key {record.get('__key__', '?')}"
    warnings.warn(f"skipping sample ({skip}) in {where}; later ones are only counted", stacklevel=2)


class EpochOfBatches:
    """A fixed number of batches per epoch, read from one persistent iterator.

    Lightning restarts iteration each epoch; continuing the same endless stream (instead of
    restarting it) means epoch 2 sees new samples, not a replay of epoch 1.
    """

    def __init__(self, loader: Iterable, batches_per_epoch: int) -> None:
        self.loader = loader
        self.batches_per_epoch = batches_per_epoch
        self._iterator: Iterator | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        for _ in range(self.batches_per_epoch):
            yield next(self._iterator)
