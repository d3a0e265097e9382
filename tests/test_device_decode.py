"""``data.decode_on_device``: workers pass JPEG bytes on and the batch is decoded, oriented,
cropped and resized where it lands. It must give the worker path's batch: same keys, shapes
and dtypes, the same geometry, and nearly the same pixels (the worker decodes at a reduced
DCT scale when it can, the device decodes in full)."""

from __future__ import annotations

import pickle
import random
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torch.utils.data import default_collate
from torch.utils.data._utils.pin_memory import pin_memory

from pbe_lightning.data import device_decode
from pbe_lightning.data.crops import CropSampler
from pbe_lightning.data.device_decode import DISPLAY, crop_resize, decode_batch
from pbe_lightning.data.samples import (
    DISPLAY_TRANSPOSE,
    SKIP_REASONS,
    Encoded,
    SampleSpec,
    SkipSample,
    make_sample,
)
from pbe_lightning.data.stream import StreamState
from tests.helpers.hostile_corpus import hostile_cases

SPEC = SampleSpec(resolution=64, reference_size=32, crop_sampler=CropSampler(reference_pad=0))
DEVICE_SPEC = replace(SPEC, decode_on_device=True)
CASES = {c.name: c for c in hostile_cases(Path("unused-sentinel"))}
DECODED = [name for name, c in CASES.items() if c.reason is None]
SKIPPED = [name for name, c in CASES.items() if c.reason is not None]
# Mean abs difference, of 255: the paths differ only where the worker decodes at a reduced DCT
# scale (draft); measured <= 0.15 here and ~0.5 on noisy 3000 px photos.
TOLERANCE = 2


def record(name: str) -> dict:
    return {"__key__": name, "__url__": "memory", **CASES[name].members}


def both_paths(names: list[str], seed: int = 0) -> tuple[dict, dict]:
    """The worker path's batch and the device path's batch of the same records and draws."""
    worker = [make_sample(record(n), SPEC, random.Random(f"{seed}:{n}")) for n in names]
    device = [make_sample(record(n), DEVICE_SPEC, random.Random(f"{seed}:{n}")) for n in names]
    return default_collate(worker), decode_batch(default_collate(device), 64, 32)


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize("name", DECODED)
def test_every_decodable_record_gives_the_worker_paths_sample(name):
    for seed in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a valid record decodes quietly on both paths
            worker, device = both_paths([name], seed)
        assert device.keys() == worker.keys()
        for key in worker:
            assert device[key].dtype == worker[key].dtype, key
            assert device[key].shape == worker[key].shape, key
        for key in ("object_box", "mask_box", "crop_px", "outline_keep"):
            assert torch.equal(device[key], worker[key]), key
        assert mean_abs_diff(device["image"], worker["image"]) < TOLERANCE
        assert mean_abs_diff(device["reference"], worker["reference"]) < TOLERANCE


def test_jpegs_go_to_the_device_and_other_files_are_decoded_by_the_worker():
    expected = {
        "rgb_jpeg": "jpeg",
        "grey_jpeg": "jpeg",
        "jpeg_key_spelling": "jpeg",
        "exif_orientation_6_jpeg": "jpeg",
        "big_jpeg_decoded_by_draft": "jpeg",
        "cmyk_jpeg": "pixels",  # nvjpeg's CMYK support is patchy
        "rgb_png": "pixels",
        "png_bytes_named_jpg": "pixels",
        "webp_lossless": "pixels",
        "exif_orientation_6_png": "pixels",
    }
    for name, kind in expected.items():
        sample = make_sample(record(name), DEVICE_SPEC, random.Random(0))
        assert set(sample) == {"encoded", "object_box", "mask_box", "crop_px", "outline_keep"}
        assert sample["encoded"].kind == kind, name


def test_worker_decoded_records_keep_the_worker_paths_exact_pixels():
    worker, device = both_paths(["rgb_png", "webp_lossless", "cmyk_jpeg"])
    assert torch.equal(device["image"], worker["image"])
    assert torch.equal(device["reference"], worker["reference"])


@pytest.mark.parametrize("name", SKIPPED)
def test_broken_records_are_skipped_in_the_worker_with_the_same_reason(name):
    with pytest.raises(SkipSample) as info:
        make_sample(record(name), DEVICE_SPEC, random.Random(0))
    assert info.value.reason == CASES[name].reason


def test_a_mixed_batch_has_the_worker_batch_contract():
    names = ["rgb_jpeg", "rgb_png", "exif_orientation_7_jpeg", "webp_lossless", "grey_jpeg"]
    worker, device = both_paths(names)
    assert device.keys() == worker.keys()
    assert device["image"].shape == (5, 3, 64, 64) and device["image"].dtype == torch.uint8
    assert device["reference"].shape == (5, 3, 32, 32) and device["reference"].dtype == torch.uint8
    for row in range(len(names)):
        assert mean_abs_diff(device["image"][row], worker["image"][row]) < TOLERANCE, names[row]


def test_exif_orientations_match_pillows_transposes():
    stored = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for turn, transpose in DISPLAY_TRANSPOSE.items():
        shown = np.asarray(Image.fromarray(stored).transpose(transpose))
        ours = DISPLAY[turn](torch.from_numpy(stored).permute(2, 0, 1)).permute(1, 2, 0)
        assert np.array_equal(ours.numpy(), shown), turn


@pytest.mark.parametrize(
    "box, size",
    [
        ((13.3, 7.8, 124.6, 119.1), 36),  # shrink ~3x, fractional edges
        ((40.25, 30.5, 90.75, 81.0), 128),  # enlarge ~2.5x
        ((0.0, 0.0, 160.0, 120.0), 64),  # the whole image, not square: two scales
        ((100.4, 2.2, 159.9, 119.7), 32),  # touching the right edge
    ],
)
def test_crop_resize_is_pillows_box_resize(box, size):
    pixels = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    pillow = Image.fromarray(pixels).resize(
        (size, size), Image.BILINEAR, box=box, reducing_gap=None
    )
    ours = crop_resize(torch.from_numpy(pixels).permute(2, 0, 1), box, size).permute(1, 2, 0)
    difference = (ours.int() - torch.from_numpy(np.array(pillow)).int()).abs()
    # Pillow rounds to 8 bits between its two passes and filters in fixed point.
    assert difference.max() <= 2 and difference.float().mean() < 0.5


def test_crop_resize_in_row_chunks_gives_the_same_pixels(monkeypatch):
    image = torch.randint(0, 255, (3, 90, 120), dtype=torch.uint8)
    box = (10.5, 3.25, 97.5, 90.0)
    whole = crop_resize(image, box, 48)
    monkeypatch.setattr(device_decode, "CHUNK_ROWS", 7)
    assert torch.equal(crop_resize(image, box, 48), whole)


def test_encoded_bytes_stay_on_the_host_through_transfer_pinning_and_pickling():
    sample = make_sample(record("exif_orientation_6_jpeg"), DEVICE_SPEC, random.Random(0))
    batch = default_collate([sample, sample])
    assert isinstance(batch["encoded"], list)
    start = time.perf_counter()
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert time.perf_counter() - start < 0.05  # not walked byte by byte
    assert all(a is b for a, b in zip(moved["encoded"], batch["encoded"]))
    assert pin_memory(batch["encoded"])[0] is batch["encoded"][0]
    # Worker -> main process: what the DataLoader's queue does.
    copy = pickle.loads(pickle.dumps(sample["encoded"], protocol=pickle.HIGHEST_PROTOCOL))
    assert isinstance(copy, Encoded) and bytes(copy) == bytes(sample["encoded"])
    assert (copy.kind, copy.orientation) == ("jpeg", 6)
    assert copy.crop == sample["encoded"].crop
    assert copy.reference_box == sample["encoded"].reference_box


def test_a_jpeg_no_decoder_reads_is_replaced_by_another_sample_and_counted(monkeypatch):
    def broken(tensors, device):
        raise RuntimeError("corrupt JPEG data")

    monkeypatch.setattr(device_decode, "_decode", broken)
    names = ["rgb_jpeg", "rgb_png"]
    samples = [make_sample(record(n), DEVICE_SPEC, random.Random(i)) for i, n in enumerate(names)]
    batch = default_collate(samples)
    assert not torch.equal(batch["crop_px"][0], batch["crop_px"][1])  # two different crops
    batch["stream_state"] = StreamState(0, {}, (0,) * len(SKIP_REASONS), 2)
    with pytest.warns(UserWarning, match="could not be decoded"):
        out = decode_batch(batch, 64, 32)
    assert torch.equal(out["image"][0], out["image"][1])
    for key in ("object_box", "mask_box", "crop_px", "outline_keep"):  # the whole sample
        assert torch.equal(out[key][0], out[key][1]), key
    assert out["stream_state"].skipped[SKIP_REASONS.index("bad_image")] == 1
    with pytest.raises(RuntimeError, match="decode_on_device=false"):
        decode_batch(default_collate(samples[:1]), 64, 32)


def test_the_config_option_decodes_training_batches_on_the_device(tiny_cfg):
    """Demo shards through the real config and a loader worker, with and without the option."""
    batches = {}
    for flag in (False, True):
        cfg = tiny_cfg(f"data.decode_on_device={str(flag).lower()}", "data.num_workers=1")
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        assert datamodule.spec.decode_on_device is flag
        raw = next(iter(datamodule.train_dataloader()))
        assert ("encoded" in raw) is flag
        torch.manual_seed(0)  # the masks' draws
        batches[flag] = datamodule.on_after_batch_transfer(raw, 0)
    worker, device = batches[False], batches[True]
    assert device.keys() == worker.keys()
    assert device.pop("stream_state").skipped == worker.pop("stream_state").skipped
    for key, value in worker.items():
        assert device[key].dtype == value.dtype and device[key].shape == value.shape, key
    for key in ("object_box", "mask_box", "mask"):
        assert torch.equal(device[key], worker[key]), key
    # image in [-1, 1], reference in [0, 1]: the same tolerance in 8-bit steps.
    assert mean_abs_diff(device["image"], worker["image"]) * 127.5 < TOLERANCE
    assert mean_abs_diff(device["reference"], worker["reference"]) * 255 < TOLERANCE


def test_encoded_pixels_round_trip():
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    reference = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    encoded = Encoded.pixels(image, reference)
    back = device_decode.unpack_pixels(encoded, 64, 32, torch.device("cpu"))
    assert torch.equal(back[0], image) and torch.equal(back[1], reference)
