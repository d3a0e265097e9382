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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from pbe_lightning.data.samples import SKIP_REASONS, SampleSpec, SkipSample, make_sample
from pbe_lightning.shutdown import signals_held


@dataclass(frozen=True)
class StreamPlace:
    """Where a loader process sits in a DDP run: global rank and world size."""

    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class StreamPosition:
    """How far this rank's stream has been consumed: resume replays exactly from here.

    ``next_batch`` counts batches handed to training; ``records[l]`` counts raw records that
    worker stream ``l`` has read. Batches come from workers round-robin, so batch ``i`` is
    always worker stream ``i % workers``'s, which lets a resumed loader rotate its workers.
    """

    next_batch: int = 0
    records: tuple[int, ...] = ()


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
        position: StreamPosition = StreamPosition(),
    ) -> None:
        self.urls = urls
        self.spec = spec
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.place = place
        self.position = position
        # An endless stream of unusable records would otherwise hang training silently.
        self.give_up_after = max(1000, 50 * batch_size)

    def worker_stream(self) -> tuple[int, int]:
        """(logical worker stream, workers). Rotated on resume so the round-robin order of
        the DataLoader hands out batch ``next_batch`` first, as the original run would have."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return (worker + self.position.next_batch) % workers, workers

    def __iter__(self) -> Iterator[dict]:
        logical, workers = self.worker_stream()
        stream = self.place.rank * workers + logical
        rng = random.Random(f"shards:{self.seed}:{stream}")
        done = self.position.records[logical] if self.position.records else 0
        batch_number = (self.position.next_batch - logical + workers - 1) // workers
        skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        read = 0
        batch: list[dict] = []
        warned: set[str] = set()
        for index, record in enumerate(self.records(rng, skipped)):
            if index < done:  # already trained on: replay shard picks and shuffle, skip decoding
                skipped.zero_()  # corrupt shards met while replaying were counted before
                continue
            read += 1
            if read > self.give_up_after:
                raise RuntimeError(
                    f"{read} records in a row from {self.urls[:3]}... gave no usable sample "
                    f"(skips by reason: {dict(zip(SKIP_REASONS, skipped.tolist()))}): the data "
                    "is broken; inspect a few records and the first skip warning of each reason"
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
                # A copy: records() keeps counting corrupt shards into this same tensor.
                out["skipped"], out["records_read"] = skipped.clone(), torch.tensor(read)
                out["stream_index"] = torch.tensor(batch_number * workers + logical)
                out["stream_records"] = torch.tensor(index + 1)
                yield out
                batch_number += 1
                batch, read = [], 0
                skipped.zero_()

    def records(self, rng: random.Random, skipped: torch.Tensor) -> Iterator[dict]:
        """Endless raw records: shards drawn with replacement, then buffer-shuffled."""
        corrupt = SKIP_REASONS.index("corrupt_shard")

        def shard_records() -> Iterator[dict]:
            unreadable_in_a_row = 0
            while True:
                url = rng.choice(self.urls)
                errors: list[Exception] = []
                records_read = 0
                # One pipeline per shard: a record cut short by a broken shard ends with its
                # shard instead of merging into the next shard's first record (same key).
                for record in wds.tarfile_samples([{"url": url}], handler=_collect_into(errors)):
                    records_read += 1
                    yield record
                if errors:
                    # webdataset may report one cut shard twice (the member, then the archive).
                    skipped[corrupt] += 1
                    warnings.warn(
                        f"skipped the rest of corrupt shard {url}: {errors[0]}", stacklevel=2
                    )
                unreadable_in_a_row = unreadable_in_a_row + 1 if errors and not records_read else 0
                if unreadable_in_a_row > self.give_up_after:
                    raise RuntimeError(
                        f"the last {unreadable_in_a_row} shards read were all corrupt or "
                        f"unreadable, e.g. {url}: {errors[0]}"
                    )

        return shuffled(shard_records(), self.shuffle_buffer, rng)


def _collect_into(errors: list[Exception]) -> Callable[[Exception], bool]:
    def keep_going(error: Exception) -> bool:
        errors.append(error)
        return True

    return keep_going


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
            with signals_held():  # forked workers must not die of a signal before they hear it
                self._iterator = iter(self.loader)
        for _ in range(self.batches_per_epoch):
            yield next(self._iterator)
