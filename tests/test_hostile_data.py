"""The loader survives hostile data: broken records are skipped with a precise reason and
counted, unusual but valid ones decode correctly, and nothing is ever unpickled."""

from __future__ import annotations

import contextlib
import io
import pickle
import random
import re
import time
import warnings
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from pbe_lightning.data import shard_report
from pbe_lightning.data.crops import CropSampler
from pbe_lightning.data.ledger import read_ledger
from pbe_lightning.data.samples import SKIP_REASONS, SampleSpec, SkipSample, make_sample
from pbe_lightning.data.stream import RecordSource, TrainStream
from tests.helpers.hostile_corpus import (
    OBJECT,
    Case,
    HostileCorpus,
    evil_pickle,
    hostile_cases,
    write_hostile_corpus,
)

# No reference padding: the reference is exactly the object box, so it is the object's colour.
PER_SHARD = {"corrupt_shard", "empty_shard"}  # counted by the stream per shard, not per record
SPEC = SampleSpec(resolution=64, reference_size=32, crop_sampler=CropSampler(reference_pad=0))
CASES = hostile_cases(Path("unused-sentinel"))  # names and expectations, for parametrize
DECODED = [c.name for c in CASES if c.reason is None]
SKIPPED = [c.name for c in CASES if c.reason is not None]
COLOUR_TOLERANCE = 12  # JPEG, chroma subsampling and bilinear edges move the means a little


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> HostileCorpus:
    return write_hostile_corpus(tmp_path_factory.mktemp("hostile"))


def record_of(corpus: HostileCorpus, name: str) -> tuple[Case, dict]:
    case = next(c for c in corpus.cases if c.name == name)
    return case, {"__key__": name, "__url__": "memory", **case.members}


def assert_near(actual: torch.Tensor, colour: tuple[int, int, int], what: str) -> None:
    mean = actual.float().mean(dim=1)
    error = (mean - torch.tensor(colour, dtype=torch.float32)).abs().max().item()
    assert error <= COLOUR_TOLERANCE, f"{what}: mean {mean.tolist()}, expected {colour}"


def assert_sample_shows(sample: dict, case: Case) -> None:
    """Right shapes, boxes in the crop, and the object's colour where its box says it is."""
    image, reference = sample["image"], sample["reference"]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert reference.shape == (3, 32, 32) and reference.dtype == torch.uint8
    object_box, mask_box = sample["object_box"], sample["mask_box"]
    for box in (object_box, mask_box):
        assert box.min() >= -1e-5 and box.max() <= 1 + 1e-5, box
        assert box[2] > box[0] and box[3] > box[1], box
    assert_near(reference.flatten(1), case.colour, "reference")
    x0, y0, x1, y1 = (object_box * 64).tolist()
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    margin = 3  # output pixels; edges blur
    inside = (xs > x0 + margin) & (xs < x1 - margin) & (ys > y0 + margin) & (ys < y1 - margin)
    outside = (xs < x0 - margin) | (xs > x1 + margin) | (ys < y0 - margin) | (ys > y1 + margin)
    assert inside.any() and outside.any()
    assert_near(image[:, inside], case.colour, "object in the crop")
    assert_near(image[:, outside], case.background, "background in the crop")


@pytest.mark.parametrize("name", DECODED)
def test_unusual_valid_records_decode_to_what_they_display(corpus, name):
    case, record = record_of(corpus, name)
    for seed in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a valid record decodes quietly
            sample = make_sample(record, SPEC, random.Random(seed))
        assert_sample_shows(sample, case)
    assert not corpus.sentinel.exists()


@pytest.mark.parametrize("name", SKIPPED)
def test_broken_records_are_skipped_with_a_precise_reason(corpus, name):
    case, record = record_of(corpus, name)
    with pytest.raises(SkipSample) as info:
        make_sample(record, SPEC, random.Random(0))
    assert info.value.reason == case.reason, str(info.value)


def test_skip_reasons_keep_the_names_and_positions_other_code_uses():
    old = ("corrupt_shard", "missing_image", "missing_json", "bad_image", "bad_json")
    old += ("no_valid_box", "too_small", "too_large")
    assert SKIP_REASONS[: len(old)] == old and "bad_boxes" in SKIP_REASONS
    assert {c.reason for c in CASES if c.reason} | PER_SHARD == set(SKIP_REASONS)


def test_the_corpus_orientations_agree_with_pillows_own_exif_transpose():
    # Guards the corpus itself: its EXIF images show the object where the boxes say.
    rotated = [c for c in CASES if re.fullmatch(r"exif_orientation_\d_(jpeg|png)", c.name)]
    assert len(rotated) == 8
    for case in rotated:
        data = case.members.get("jpg") or case.members["png"]
        shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
        x0, y0, x1, y1 = (2 * v for v in OBJECT)
        assert shown.shape[:2] == (256, 384), case.name
        assert abs(int(shown[(y0 + y1) // 2, (x0 + x1) // 2, 0]) - case.colour[0]) < 20
        assert abs(int(shown[5, 5, 0]) - case.background[0]) < 20


def test_decompression_bombs_are_rejected_from_the_header_before_decoding(corpus, monkeypatch):
    # Pixel memory is only allocated by load(); a bomb must never get there.
    loads: list[str] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: loads.append(image.format))
    bombs = [c.name for c in CASES if c.reason == "too_large"]
    assert len(bombs) >= 3
    for name in bombs:
        _, record = record_of(corpus, name)
        start = time.perf_counter()
        with pytest.raises(SkipSample, match="too_large"):
            make_sample(record, SPEC, random.Random(0))
        assert time.perf_counter() - start < 0.5, name
    assert loads == []


def test_truncated_images_are_skipped_not_decoded_partially(corpus):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nothing switched it on globally
    for name in ("truncated_jpeg", "truncated_png"):
        _, record = record_of(corpus, name)
        with pytest.raises(SkipSample, match="bad_image"):
            make_sample(record, SPEC, random.Random(0))


def test_the_pickle_payload_would_leave_a_trace_if_unpickled(tmp_path):
    # Proves the sentinel checks below can fail: this payload does create its file.
    canary = tmp_path / "canary"
    pickle.loads(evil_pickle(canary))
    assert canary.exists()


@pytest.mark.parametrize("seed", range(3))
def test_damaged_images_never_raise_anything_but_skip_sample(corpus, seed):
    rng = random.Random(seed)
    for name in ("rgb_jpeg", "rgb_png", "webp_lossless", "exif_orientation_6_jpeg"):
        case, record = record_of(corpus, name)
        key = next(k for k in ("jpg", "png", "webp") if k in case.members)
        for _ in range(15):
            data = bytearray(case.members[key])
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            damaged = {**record, key: bytes(data[: rng.randint(len(data) // 2, len(data))])}
            with contextlib.suppress(SkipSample):
                assert_well_formed(make_sample(damaged, SPEC, random.Random(0)))


def assert_well_formed(sample: dict) -> None:
    assert sample["image"].shape == (3, 64, 64) and sample["reference"].shape == (3, 32, 32)


# ----------------------------------------------------------------------------- the stream
class InOrder:
    """Picks the shards in order, round and round, so one pass reads each shard once."""

    def __init__(self, count: int) -> None:
        self.count, self.drawn = count, 0

    def next_shard(self) -> int:
        self.drawn += 1
        return (self.drawn - 1) % self.count


@pytest.fixture(scope="module")
def one_pass(corpus: HostileCorpus) -> dict:
    """Every shard once through the stream's RecordSource (its tar reading and corrupt-shard
    counting), each record through make_sample, as the training stream does."""
    urls = [str(p) for p in corpus.shards]
    counted = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    reasons, keys, samples = Counter(), [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per corrupt shard
        records = RecordSource(urls, InOrder(len(urls)), 1, random.Random(0), counted, 1000)
        for index, record in enumerate(islice(records, corpus.expected.records)):
            keys.append(record["__key__"])
            try:
                make_sample(record, SPEC, random.Random(index))
                samples += 1
            except SkipSample as skip:
                reasons[skip.reason] += 1
    counted_by_reason = dict(zip(SKIP_REASONS, counted.tolist()))
    return {"counted": counted_by_reason, "reasons": reasons, "keys": keys, "samples": samples}


def test_one_pass_through_the_stream_gives_every_sample_and_skip_reason(corpus, one_pass):
    expected = corpus.expected
    assert one_pass["samples"] == expected.samples
    per_record = {r: n for r, n in expected.skips.items() if r not in PER_SHARD}
    assert one_pass["reasons"] == Counter(per_record)
    assert len(set(one_pass["keys"])) == len(one_pass["keys"])  # no record read twice or merged
    # Every corrupt shard is noticed (exactly once each: see the next test).
    assert one_pass["counted"]["corrupt_shard"] >= expected.skips["corrupt_shard"]
    assert not corpus.sentinel.exists()


def test_each_corrupt_or_empty_shard_counts_once(corpus, one_pass):
    for reason in PER_SHARD:
        assert one_pass["counted"][reason] == corpus.expected.skips[reason], reason


def test_the_training_stream_yields_well_formed_batches_from_hostile_shards(corpus):
    stream = TrainStream([str(p) for p in corpus.shards], SPEC, batch_size=4, shuffle_buffer=8)
    per_record = torch.tensor([r not in PER_SHARD for r in SKIP_REASONS])
    total = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in islice(iter(stream), 25):
            assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.uint8
            assert batch["reference"].shape == (4, 3, 32, 32)
            skipped = torch.tensor(batch["stream_state"].skipped)
            assert skipped.shape == (len(SKIP_REASONS),)
            skipped_records = int(skipped[per_record].sum())
            assert batch["stream_state"].records_read == 4 + skipped_records
            total += skipped
    assert (total[per_record] > 0).sum() >= 5  # many reasons met along the way
    assert not corpus.sentinel.exists()


def test_corrupt_shards_are_counted_in_the_batch_that_read_them(corpus):
    urls = [str(p) for p in corpus.shards if p.name in ("not-a-tar.tar", "truncated.tar")]
    stream = TrainStream(urls, SPEC, batch_size=2, seed=0, shuffle_buffer=1)
    batches, seen = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in islice(iter(stream), 8):
            batches.append(batch)
            seen.append(batch["stream_state"].skipped)
    assert all(b["stream_state"].skipped == s for b, s in zip(batches, seen))
    assert sum(s[0] for s in seen[1:]) > 0


def test_a_stream_of_only_broken_shards_stops_with_a_clear_error(corpus):
    urls = [str(p) for p in corpus.shards if p.name in ("not-a-tar.tar", "empty.tar")]
    stream = TrainStream(urls, SPEC, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="corrupt"):
            next(iter(stream))


# ----------------------------------------------------------------------------- the ledger
def expected_ledger(corpus: HostileCorpus) -> set[tuple[str, str]]:
    """(key, reason) of every hostile record, and ("-", reason) of every broken shard."""
    records = {(f"case-{i:03d}-{c.name}", c.reason) for i, c in enumerate(corpus.cases) if c.reason}
    shards = {("-", r) for r in PER_SHARD for _ in range(corpus.expected.skips[r])}
    return records | shards | {("cut-2", "missing_json")}


def test_inspect_writes_a_ledger_naming_every_skipped_record_and_shard(corpus, tmp_path):
    ledger = tmp_path / "skipped.tsv"
    shard_report.main([*map(str, corpus.shards), "--out", "", "--ledger", str(ledger)])
    lines = read_ledger(ledger)
    assert {(key, reason) for _, key, reason, _ in lines} == expected_ledger(corpus)
    assert len(lines) == sum(corpus.expected.skips.values())  # one line per skip, no more
    broken = {url.rsplit("/", 1)[1] for url, key, _, _ in lines if key == "-"}
    assert broken == {"not-a-tar.tar", "empty.tar", "truncated.tar", "no-records.tar"}


def test_training_streams_write_the_same_ledger(corpus, tmp_path):
    stream = TrainStream(
        [str(p) for p in corpus.shards],
        SPEC,
        batch_size=4,
        shuffle_buffer=1,
        sampling="epochs",  # each pass reads every shard once
        ledger_dir=str(tmp_path / "ledger"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(islice(iter(stream), corpus.expected.samples // 4 + 2))  # a pass and more
    lines = read_ledger(tmp_path / "ledger")
    assert [p.name for p in (tmp_path / "ledger").iterdir()] == ["stream0000.tsv"]
    assert expected_ledger(corpus) <= {(key, reason) for _, key, reason, _ in lines}
    usable = {f"case-{i:03d}-{c.name}" for i, c in enumerate(corpus.cases) if not c.reason}
    assert not {key for _, key, _, _ in lines} & usable  # usable records are not listed
