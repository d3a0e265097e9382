"""The training sample stream: endless, deterministic, seekable, the same length on every rank.

Each (rank, worker) pair reads its own endless stream of raw records: shards picked by a
seeded picker (with replacement, or each shard once per pass across all streams), read in
order, records shuffled in a seeded buffer, each record turned into a sample with an RNG
seeded by its position. Endless streams cut into fixed-length epochs give every DDP rank the
same number of batches (unequal shards otherwise make the fastest rank hang at epoch end), and
seeding by position makes the stream reproducible.

A stream's whole state is small: its picker's and buffer's RNG states, the shard it is
reading and how far, and which records wait in the shuffle buffer. Every batch carries that
state; a checkpoint keeps the state of the last consumed batch of each stream, and a resumed
stream seeks there (it re-reads the shard in flight and the records of its buffer) instead of
reading through everything consumed so far. webdataset's ``wds.resampled`` and shard
shufflers keep no such state, and ``wids`` needs an index of every shard (random access);
torchdata's ``StatefulDataLoader`` snapshots workers but replays iterable datasets.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset import tariterators

from pbe_lightning.data.ledger import SkipLedger
from pbe_lightning.data.remote import open_shard
from pbe_lightning.data.samples import SKIP_REASONS, SampleSpec, SkipSample, make_sample
from pbe_lightning.shutdown import signals_held
from pbe_lightning.stops import DataBroken

SAMPLING = ("resampled", "epochs")
DEFAULT_SOURCE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class StreamPlace:
    """Where a loader process sits in a DDP run: global rank and world size."""

    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class StreamPosition:
    """Where this rank's streams resume.

    ``next_batch`` counts batches handed to training; ``streams[l]`` is the saved state of
    worker stream ``l`` after its last consumed batch (None: it has not delivered one yet).
    Batches come from workers round-robin, so batch ``i`` is always worker stream
    ``i % workers``'s, which lets a resumed loader rotate its workers.
    """

    next_batch: int = 0
    streams: tuple[dict | None, ...] = ()


@dataclass
class StreamState:
    """Rides along in each batch, on the host: where the batch sits in its rank's stream.

    ``index``: the batch's number on this rank; ``state``: its worker stream's state right
    after it (what a checkpoint saves); ``skipped``: records skipped while making it, per
    ``SKIP_REASONS``; ``records_read``: raw records read for it. Plain Python values in a
    plain object, so collate and pinning pass it through; the DataModule keeps it off the
    device transfer, and nothing needs a device-to-host read to count.
    """

    index: int
    state: dict
    skipped: tuple[int, ...]
    records_read: int


class ShardPicker(Protocol):
    def next_shard(self) -> int: ...
    def state(self) -> dict: ...
    def load(self, state: dict) -> None: ...


class ResampledShards:
    """Shards drawn with replacement from all shards, forever (webdataset's ``resampled``)."""

    def __init__(self, count: int, seed: str) -> None:
        self.count = count
        self.rng = random.Random(f"shards:{seed}")

    def next_shard(self) -> int:
        return self.rng.randrange(self.count)

    def state(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load(self, state: dict) -> None:
        self.rng.setstate(state["rng"])


class EpochShards:
    """Exact epochs: each pass shuffles all shards and deals them out to the streams.

    Stream ``s`` of ``S`` reads shards ``order[s::S]`` of pass ``e``, so across all ranks and
    workers every shard (hence every image) is read once per pass. Streams run at their own
    pace, so one may start its next pass while another finishes the last shard of this one.
    """

    def __init__(self, count: int, seed: int, stream: int, streams: int) -> None:
        if count < streams:
            raise ValueError(
                f"data.sampling=epochs deals whole shards to {streams} loader streams (ranks x "
                f"data.num_workers) but there are only {count} shards: write more, smaller "
                "shards, lower data.num_workers, or use data.sampling=resampled"
            )
        self.count, self.seed, self.stream, self.streams = count, seed, stream, streams
        self.epoch, self.cursor = 0, 0
        self._mine = self.shards_of(0)

    def shards_of(self, epoch: int) -> list[int]:
        order = list(range(self.count))
        random.Random(f"epoch:{self.seed}:{epoch}").shuffle(order)
        return order[self.stream :: self.streams]

    def next_shard(self) -> int:
        if self.cursor == len(self._mine):
            self.load({"epoch": self.epoch + 1, "cursor": 0})
        self.cursor += 1
        return self._mine[self.cursor - 1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._mine = self.shards_of(self.epoch)


class RecordSource:
    """Endless raw records: shards from a picker, each read in order, then buffer-shuffled.

    ``state()`` is everything needed to continue exactly; ``seek(state)`` continues there by
    reading only the shard in flight and the records sitting in the buffer.
    """

    def __init__(
        self,
        urls: list[str],
        picker: ShardPicker,
        buffer_size: int,
        buffer_rng: random.Random,
        skipped: torch.Tensor,
        give_up_after: int,
        timeout_s: float = DEFAULT_SOURCE_TIMEOUT_S,
        ledger: SkipLedger | None = None,
    ) -> None:
        self.urls = urls
        self.ledger = ledger or SkipLedger(None)
        self.timeout_s = timeout_s
        self.picker = picker
        self.buffer_size = max(1, buffer_size)
        self.buffer_rng = buffer_rng
        self.skipped = skipped  # counts corrupt shards into the caller's tensor
        self.give_up_after = give_up_after
        self.buffer: list[dict] = []
        self.buffer_ids: list[tuple[int, int]] = []  # (shard, member) of each buffered record
        self.shard, self.offset = -1, 0
        self._reader: Iterator[dict] | None = None
        self._errors: list[Exception] = []
        self._unreadable_in_a_row = 0
        self._warned_shards: set[int] = set()
        self._dead: set[int] = set()  # shards read without a record since the last one that had

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while len(self.buffer) < self.buffer_size:
            record = self._read()
            self.buffer_ids.append((self.shard, self.offset - 1))
            self.buffer.append(record)
        pick = self.buffer_rng.randrange(len(self.buffer))
        self.buffer_ids.pop(pick)
        return self.buffer.pop(pick)

    def _read(self) -> dict:
        """The next record of the shard in flight (opening shards as they run out)."""
        while True:
            if self._reader is None:
                self._open(self.picker.next_shard())
            record = next(self._reader, None)
            if record is not None:
                self.offset += 1
                return record
            self._close()

    def _open(self, shard: int) -> None:
        self.shard, self.offset, self._errors = shard, 0, []
        self._reader = shard_reader(self.urls[shard], self._errors, self.timeout_s)

    def _close(self) -> None:
        url, errors = self.urls[self.shard], self._errors
        why = error_message(errors[0]) if errors else ""
        if errors:
            # webdataset may report one cut shard twice (the member, then the archive).
            self._skip_shard("corrupt_shard", f"skipped the rest of corrupt shard {url}: {why}")
        elif not self.offset:
            self._skip_shard("empty_shard", f"shard {url} is a tar without records")
        # A shard list of only broken or empty shards would otherwise spin forever.
        self._unreadable_in_a_row = 0 if self.offset else self._unreadable_in_a_row + 1
        # Every shard failing since the last good one, or a long run of failures (with
        # replacement, drawing each of many dead shards once takes several times their number).
        self._dead = set() if self.offset else self._dead | {self.shard}
        dead = len(self._dead) == len(self.urls) or self._unreadable_in_a_row >= max(
            50, len(self.urls)
        )
        if self._unreadable_in_a_row > self.give_up_after or dead:
            why = why or "no records"
            raise DataBroken(
                f"the last {self._unreadable_in_a_row} shards read were all corrupt, "
                f"unreadable or empty, e.g. {url}: {why}; check data.shards"
            )
        self._reader = None

    def _skip_shard(self, reason: str, message: str) -> None:
        """Counted every time; warned once per shard (shards are drawn again and again)."""
        self.skipped[SKIP_REASONS.index(reason)] += 1
        self.ledger.write(self.urls[self.shard], "-", reason, message)
        if self.shard not in self._warned_shards:
            self._warned_shards.add(self.shard)
            warnings.warn(f"{message} (warned once per shard; every read is counted)", stacklevel=4)

    def state(self) -> dict:
        """Plain ints and tuples: checkpoints load with torch's ``weights_only``."""
        return {
            "picker": self.picker.state(),
            "buffer_rng": self.buffer_rng.getstate(),
            "shard": self.shard if self._reader is not None else -1,
            "offset": self.offset,
            "buffer": tuple(self.buffer_ids),
        }

    def seek(self, state: dict) -> None:
        """Continue where ``state`` was taken: refill the buffer, reopen the shard in flight."""
        self.picker.load(state["picker"])
        self.buffer_rng.setstate(state["buffer_rng"])
        wanted = [tuple(where) for where in state["buffer"]]
        found: dict[tuple[int, int], dict] = {}
        if state["shard"] >= 0:
            self._open(state["shard"])
            in_flight = {where for where in wanted if where[0] == self.shard}
            for member in range(state["offset"]):
                record = next(self._reader, None)
                if record is None:
                    break
                self.offset += 1
                if (self.shard, member) in in_flight:
                    found[(self.shard, member)] = record
        # Buffered records of other shards, or of an earlier read of the shard in flight
        # (shards drawn with replacement can come round again while records wait).
        need = [where for where in wanted if where not in found]
        for shard in sorted({s for s, _ in need}):
            members = {m for s, m in need if s == shard}
            found.update(read_members(self.urls[shard], shard, members, max(members) + 1))
        missing = [where for where in wanted if where not in found]
        if missing:
            shard, member = missing[0]
            warnings.warn(
                f"{len(missing)} buffered records could not be read back (e.g. record {member} "
                f"of {self.urls[shard]}): the shards changed since the checkpoint; the stream "
                "continues without them",
                stacklevel=2,
            )
        self.buffer_ids = [where for where in wanted if where in found]
        self.buffer = [found[where] for where in self.buffer_ids]


def shard_reader(
    url: str, errors: list[Exception], timeout_s: float = DEFAULT_SOURCE_TIMEOUT_S
) -> Iterator[dict]:
    """One pipeline per shard: a record cut short by a broken shard ends with its shard
    instead of merging into the next shard's first record (same key). The shard is opened by
    ``remote.open_shard`` (local, pipe:, s3://, gs://, http(s)://, with a no-output timeout);
    webdataset splits the tar into records."""
    handler = _collect_into(errors)
    try:
        stream = open_shard(url, timeout_s)
    except OSError as error:  # a missing local file: counted like an unreadable shard
        errors.append(error)
        return iter(())
    files = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
    return _closing(tariterators.group_by_keys(files, handler=handler), stream)


def _closing(records: Iterator[dict], stream: BinaryIO) -> Iterator[dict]:
    try:
        yield from records
    finally:
        stream.close()  # a command still running is stopped


def read_members(url: str, shard: int, members: set[int], stop: int) -> dict:
    records: dict = {}
    for member, record in enumerate(shard_reader(url, [])):
        if member >= stop:
            break
        if member in members:
            records[(shard, member)] = record
    return records


def error_message(error: Exception) -> str:
    """The message alone: webdataset appends the stream and the URL to an error's args."""
    return str(error.args[0]) if error.args else str(error)


def _collect_into(errors: list[Exception]) -> Callable[[Exception], bool]:
    def keep_going(error: Exception) -> bool:
        errors.append(error)
        return True

    return keep_going


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
        sampling: str = "resampled",
        source_timeout_s: float = DEFAULT_SOURCE_TIMEOUT_S,
        ledger_dir: str | None = None,
    ) -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"data.sampling={sampling!r}: use one of {', '.join(SAMPLING)}")
        self.urls = urls
        self.spec = spec
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.place = place
        self.position = position
        self.sampling = sampling
        self.source_timeout_s = source_timeout_s
        self.ledger_dir = ledger_dir
        # An endless stream of unusable records would otherwise hang training silently.
        self.give_up_after = max(1000, 50 * batch_size)

    def worker_stream(self) -> tuple[int, int]:
        """(logical worker stream, workers). Rotated on resume so the round-robin order of
        the DataLoader hands out batch ``next_batch`` first, as the original run would have."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return (worker + self.position.next_batch) % workers, workers

    def source(
        self, stream: int, streams: int, skipped: torch.Tensor, ledger: SkipLedger | None = None
    ) -> RecordSource:
        """The raw records of global stream ``stream`` of ``streams``, from its start."""
        if self.sampling == "epochs":
            picker = EpochShards(len(self.urls), self.seed, stream, streams)
        else:
            picker = ResampledShards(len(self.urls), f"{self.seed}:{stream}")
        buffer_rng = random.Random(f"buffer:{self.seed}:{stream}")
        return RecordSource(
            self.urls,
            picker,
            self.shuffle_buffer,
            buffer_rng,
            skipped,
            self.give_up_after,
            self.source_timeout_s,
            ledger,
        )

    def ledger_file(self, stream: int) -> Path | None:
        """This stream's own ledger file: one writer per file, whatever the rank or worker."""
        if not self.ledger_dir:
            return None
        return Path(self.ledger_dir) / f"stream{stream:04d}.tsv"

    def __iter__(self) -> Iterator[dict]:
        logical, workers = self.worker_stream()
        stream = self.place.rank * workers + logical
        skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        ledger = SkipLedger(self.ledger_file(stream))
        source = self.source(stream, self.place.world_size * workers, skipped, ledger)
        saved = self.position.streams[logical] if self.position.streams else None
        index = 0
        if saved is not None:
            source.seek(saved)
            index = saved["records"]
        batch_number = (self.position.next_batch - logical + workers - 1) // workers
        read = 0
        batch: list[dict] = []
        warned: set[str] = set()
        for record in source:
            index += 1
            read += 1
            if read > self.give_up_after:
                raise DataBroken(
                    f"{read} records in a row from {self.urls[:3]}... gave no usable sample "
                    f"(skips by reason: {dict(zip(SKIP_REASONS, skipped.tolist()))}): the data "
                    "is broken; inspect a few records and the first skip warning of each reason"
                )
            try:
                sample_rng = random.Random(f"sample:{self.seed}:{stream}:{index - 1}")
                batch.append(make_sample(record, self.spec, sample_rng))
            except SkipSample as skip:
                skipped[SKIP_REASONS.index(skip.reason)] += 1
                ledger.write(
                    record.get("__url__", "?"), record.get("__key__"), skip.reason, str(skip)
                )
                warn_first(skip, record, warned)
                continue
            if len(batch) == self.batch_size:
                out = default_collate(batch)
                out["stream_state"] = StreamState(
                    batch_number * workers + logical,
                    {**source.state(), "records": index},
                    tuple(skipped.tolist()),
                    read,
                )
                yield out
                batch_number += 1
                batch, read = [], 0
                skipped.zero_()


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
