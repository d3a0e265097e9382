"""The training stream resumes by seeking, not replaying, and continues bit for bit."""

from __future__ import annotations

import json
import random
import tarfile
import warnings
from dataclasses import replace
from itertools import islice

import pytest
import torch

from pbe_lightning.data import stream as stream_module
from pbe_lightning.data.crops import CropSampler
from pbe_lightning.data.datamodule import expand_urls
from pbe_lightning.data.samples import SKIP_REASONS, SampleSpec, SkipSample, make_sample
from pbe_lightning.data.stream import EpochShards, StreamPlace, StreamPosition, TrainStream
from pbe_lightning.demo.dataset import demo_shard_pattern, ensure_demo_dataset

SPEC = SampleSpec(resolution=64, reference_size=32)
EMPTY, CORRUPT = SKIP_REASONS.index("empty_shard"), SKIP_REASONS.index("corrupt_shard")
PER_SHARD = 5  # small shards: a few batches cross shard boundaries
BUFFER = 8  # larger than a shard: the buffer holds records of several shards


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("small_shards")
    ensure_demo_dataset(root, samples=12 * PER_SHARD, per_shard=PER_SHARD, size=64)
    return expand_urls(demo_shard_pattern(root, 12))


def make_stream(
    urls: list[str], sampling: str, position: StreamPosition | None = None
) -> TrainStream:
    return TrainStream(
        urls,
        SPEC,
        batch_size=3,
        seed=5,
        shuffle_buffer=BUFFER,
        position=position or StreamPosition(),
        sampling=sampling,
    )


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("image", "reference", "object_box", "mask_box"):
            assert torch.equal(x[key], y[key]), key
        assert x["stream_state"].state == y["stream_state"].state


@pytest.mark.parametrize("sampling", ["resampled", "epochs"])
def test_a_stream_resumed_from_a_batchs_state_continues_bit_for_bit(urls, sampling):
    uninterrupted = list(islice(iter(make_stream(urls, sampling)), 14))
    for stop in (4, 9):  # after several shards: the buffer is full and spans shards
        state = uninterrupted[stop]["stream_state"].state
        assert len(state["buffer"]) == BUFFER - 1  # full: one drawn, refilled before the next
        assert len({shard for shard, _ in state["buffer"]}) >= 2
        position = StreamPosition(next_batch=stop + 1, streams=(state,))
        resumed = list(islice(iter(make_stream(urls, sampling, position)), 14 - stop - 1))
        assert_same_batches(resumed, uninterrupted[stop + 1 :])


def test_every_loader_stream_crops_its_own_way_even_from_the_same_records(urls):
    # Stream = rank x workers + worker: ranks 0 and 1 with one worker each are streams 0 and 1,
    # as workers 0 and 1 of one rank would be. One shard read in order: the same records.
    # The demo's scenes are square, which the public code's sampler never crops: ours does.
    spec = replace(SPEC, crop_sampler=CropSampler(mode="ours"))
    streams = [
        TrainStream(urls[:1], spec, 3, seed=5, shuffle_buffer=1, place=StreamPlace(rank, 2))
        for rank in (0, 1)
    ]
    first, second = (next(iter(stream)) for stream in streams)
    keys = ("shard", "offset", "records")
    where = [{k: batch["stream_state"].state[k] for k in keys} for batch in (first, second)]
    assert where[0] == where[1]  # the same records, read the same way
    assert not torch.equal(first["mask_box"], second["mask_box"])  # cropped differently
    assert not torch.equal(first["image"], second["image"])


def test_a_resumed_stream_reads_only_its_buffer_and_the_shard_in_flight(urls, monkeypatch):
    far = list(islice(iter(make_stream(urls, "resampled")), 60))[-1]["stream_state"].state
    assert far["records"] > 150  # ~30 shards consumed
    read = []
    original = stream_module.shard_reader

    def counting_reader(url: str, errors: list, *options: object) -> object:
        for record in original(url, errors, *options):
            read.append(url)
            yield record

    monkeypatch.setattr(stream_module, "shard_reader", counting_reader)
    position = StreamPosition(next_batch=60, streams=(far,))
    next(iter(make_stream(urls, "resampled", position)))
    # Seek: buffered records (<= BUFFER) + the shard in flight; then one batch of 3 samples.
    assert len(read) <= BUFFER + PER_SHARD + 3 + PER_SHARD


def test_epochs_deal_every_shard_to_exactly_one_stream_per_pass():
    count, streams = 11, 3
    for epoch in range(3):
        dealt = [EpochShards(count, 7, s, streams).shards_of(epoch) for s in range(streams)]
        flat = [shard for shards in dealt for shard in shards]
        assert sorted(flat) == list(range(count))
    picker = EpochShards(count, 7, 0, streams)
    first_pass = [picker.next_shard() for _ in range(len(picker.shards_of(0)))]
    assert first_pass == picker.shards_of(0)
    assert picker.next_shard() == picker.shards_of(1)[0]  # then the next pass, reshuffled


def test_epochs_need_a_shard_per_stream(urls):
    with pytest.raises(ValueError, match="data.sampling=epochs.*12 shards"):
        EpochShards(12, 0, 0, 16)
    with pytest.raises(ValueError, match="data.sampling='bogus'"):
        make_stream(urls, "bogus")


def test_a_broken_shard_drawn_again_and_again_is_counted_each_time_but_warned_once(urls, tmp_path):
    empty = tmp_path / "no-records.tar"
    with tarfile.open(empty, "w"):
        pass  # a valid tar without members
    corrupt = tmp_path / "not-a-tar.tar"
    corrupt.write_bytes(b"<html>403</html>" * 64)
    stream = make_stream([*urls[:2], str(empty), str(corrupt)], "resampled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(islice(iter(stream), 30))
    counts = [sum(b["stream_state"].skipped[i] for b in batches) for i in (EMPTY, CORRUPT)]
    assert counts[0] > 1 and counts[1] > 1  # drawn (and counted) many times
    messages = [str(w.message) for w in caught if w.category is UserWarning]
    assert sum("no-records.tar" in m for m in messages) == 1
    assert sum("not-a-tar.tar" in m for m in messages) == 1


def test_a_shard_list_of_only_empty_tars_stops_with_a_clear_error(tmp_path):
    empties = []
    for index in range(3):
        empties.append(tmp_path / f"empty-{index}.tar")
        with tarfile.open(empties[-1], "w"):
            pass
    stream = make_stream([str(p) for p in empties], "resampled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="corrupt, unreadable or empty.*no records"):
            next(iter(stream))


def test_a_record_of_a_million_boxes_is_skipped_before_it_is_parsed():
    boxes = json.dumps({"boxes": [[1, 2, 3, 4]] * 1_000_000}).encode()
    with pytest.raises(SkipSample, match="json_too_large.*data.max_json_bytes"):
        make_sample({"json": boxes, "jpg": b"not read"}, SPEC, random.Random(0))
    few = json.dumps({"boxes": [[1, 2, 3, 4]] * 20}).encode()
    with pytest.raises(SkipSample, match="too_many_boxes.*data.max_boxes=10"):
        make_sample(
            {"json": few, "jpg": b"not read"}, replace(SPEC, max_boxes=10), random.Random(0)
        )
