"""Data-loading cost: the public Paint-by-Example per-sample CPU pipeline against ours.

    python bench/data_throughput.py                 # CPU: everything, ~6 min on 2 cores
    python bench/data_throughput.py --device cuda   # the batched device side on a GPU

Generates (once, cached) ``--images`` synthetic photo-like JPEGs of 640-1024 px with boxes in
the shard contract, and sets of photos of ``--sizes`` px (long side), then measures in one run:

- CPU time per sample of the per-sample work, single process, one torch thread (what each
  DataLoader worker runs with): ``reference`` (public code: full decode, full-image float
  tensor and mask, crop, resize, per-sample flip/rotate/blur/elastic of the reference),
  ``ours`` (``make_sample``: DCT-scaled decode where both crops allow it, crop and resize
  with torch's uint8 kernel, uint8 out) and ``ours-device``
  (``make_sample`` with ``decode_on_device``: json + header only, JPEG bytes out);
- samples/s through a DataLoader with 1 and 2 workers (batches collated in the worker, as
  ``TrainStream`` does), with the CPU time the workers spent per sample;
- the batched device side per batch: ``device_transform`` (masks + Kornia augmentation) and,
  for ``ours-device``, ``decode_batch`` (decode, orient, crop, resize), on ``--device``;
- a cProfile of ``make_sample``: where our remaining worker time goes;
- per photo size (``--sizes``, default 640, 1280 and 2560 px): worker CPU per sample of
  ``reference`` and ``ours`` and their ratio, the profile summary, and how far ``ours``'s
  crops are from float crops of the full-resolution photo (``--accuracy`` samples a size).

Timings on shared machines are noisy: each is repeated ``--repeats`` times and the median shown.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from hydra.utils import instantiate
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pbe_lightning.data import crop_resize, samples
from pbe_lightning.data.crops import BoxFilter, CropSampler, choose_box
from pbe_lightning.data.datamodule import device_transform
from pbe_lightning.data.device_decode import decode_batch
from pbe_lightning.data.samples import (
    DISPLAY_TRANSPOSE,
    SampleSpec,
    SkipSample,
    decode_scale,
    make_sample,
    open_image,
    orientation,
)
from pbe_lightning.data.shard_report import load_data_config

DATA_VERSION = 1
PER_SHARD = 100
Sample = Callable[[dict, random.Random], dict]


# ----------------------------------------------------------------------------- data
def ensure_shards(root: Path, images: int, seed: int = 0, size: int | None = None) -> list[str]:
    """Synthetic photo-like JPEGs in shards, generated once per (version, count, seed, size).

    ``size``: every photo's long side in px (the short side 2/3 to 1 of it, either way up);
    None: 640-1024 px per side, the original set."""
    manifest = {"version": DATA_VERSION, "images": images, "seed": seed}
    if size is not None:
        manifest["size"] = size
    shards = [str(root / f"bench-{i:04d}.tar") for i in range(math.ceil(images / PER_SHARD))]
    done = root / "manifest.json"
    if done.is_file() and json.loads(done.read_text()) == manifest:
        return shards
    root.mkdir(parents=True, exist_ok=True)
    print(f"generating {images} images into {root} (once)", flush=True)
    for number, shard in enumerate(shards):
        with wds.TarWriter(shard) as sink:
            for index in range(number * PER_SHARD, min(images, (number + 1) * PER_SHARD)):
                rng = np.random.default_rng([seed, index])
                jpeg, boxes = synthetic_photo(rng) if size is None else sized_photo(rng, size)
                sink.write({"__key__": f"img{index:06d}", "jpg": jpeg, "json": {"boxes": boxes}})
    done.write_text(json.dumps(manifest))
    return shards


def synthetic_photo(rng: np.random.Generator) -> tuple[bytes, list[list[float]]]:
    """Smooth colour fields, textured objects and sensor-like noise: JPEG bitrates of photos."""
    width, height = (int(v) for v in rng.integers(640, 1025, 2))
    field = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(rng.integers(1, 5)):
        w, h = rng.uniform(0.12, 0.7) * width, rng.uniform(0.12, 0.7) * height
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=fill, outline=(0, 0, 0), width=3)
        boxes.append([round(v, 1) for v in (x0, y0, x0 + w, y0 + h)])
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
    pixels += rng.normal(0, 7, pixels.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue(), boxes


def sized_photo(rng: np.random.Generator, size: int) -> tuple[bytes, list[list[float]]]:
    """A photo with a ``size`` px long side, objects of 8-75 % of each side (log-uniform, so
    that small objects, frequent in real photos, are too), the first one at least 15 %."""
    short = int(size * rng.uniform(2 / 3, 1.0))
    width, height = (size, short) if rng.random() < 0.7 else (short, size)
    field = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    boxes = []
    for number in range(rng.integers(1, 5)):
        low = math.log(0.15 if number == 0 else 0.08)
        w, h = (math.exp(rng.uniform(low, math.log(0.75))) * side for side in (width, height))
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        outline = max(3, size // 320)
        shape((x0, y0, x0 + w, y0 + h), fill=fill, outline=(0, 0, 0), width=outline)
        boxes.append([round(v, 1) for v in (x0, y0, x0 + w, y0 + h)])
    blur = image.filter(ImageFilter.GaussianBlur(1.5 * size / 800))
    pixels = np.asarray(blur, dtype=np.float32)
    pixels += rng.normal(0, 7, pixels.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue(), boxes


def load_records(shards: list[str]) -> list[dict]:
    return [r for url in shards for r in wds.tarfile_samples([{"url": url}])]


# ----------------------------------------------------------------------------- reference
class ReferencePipeline:
    """Per-sample CPU work as the public Paint-by-Example data code does it (written plainly,
    torchvision/PIL instead of albumentations/cv2): the full image becomes a float tensor and a
    full-size mask is drawn, both are cropped and resized, and the reference is augmented
    alone, one sample at a time. The crop geometry is ours, so only the pixel work differs."""

    def __init__(self, resolution: int = 512, reference_size: int = 224) -> None:
        self.resolution, self.reference_size = resolution, reference_size
        self.box_filter, self.crops = BoxFilter(), CropSampler()
        self.elastic = T.ElasticTransform(alpha=50.0, sigma=5.0)

    def __call__(self, record: dict, rng: random.Random) -> dict:
        boxes = [tuple(b) for b in json.loads(record["json"])["boxes"]]
        image = Image.open(io.BytesIO(record["jpg"])).convert("RGB")
        width, height = image.size
        box = choose_box(boxes, width, height, self.box_filter, rng)
        if box is None:
            raise SkipSample("no_valid_box")
        geometry = self.crops(box, width, height, rng)
        full = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True) * 2 - 1
        mask = TF.to_dtype(TF.pil_to_tensor(self.mask(geometry, image.size, rng)), scale=True)
        x0, y0, x1, y1 = (round(v) for v in geometry.crop)
        size = [self.resolution, self.resolution]
        source = TF.resize(full[:, y0:y1, x0:x1], size, antialias=True)
        mask = TF.resize(mask[:, y0:y1, x0:x1], size, antialias=True)
        reference = image.crop(tuple(round(v) for v in geometry.reference_box))
        return {
            "image": source,
            "mask": mask,
            "masked_image": source * mask,
            "reference": self.augment(reference, rng),
        }

    def mask(self, geometry, size: tuple[int, int], rng: random.Random) -> Image.Image:
        """KEEP = 1 (white) with the hole drawn at full image size, half of them Bezier-edged."""
        mask = Image.new("L", size, 255)
        draw = ImageDraw.Draw(mask)
        if rng.random() < 0.5:
            draw.rectangle(geometry.mask_box, fill=0)
        else:
            draw.polygon(bezier_polygon(geometry.object_box, geometry.mask_box, rng), fill=0)
        return mask

    def augment(self, reference: Image.Image, rng: random.Random) -> torch.Tensor:
        side = self.reference_size
        reference = reference.resize((side, side), Image.BILINEAR)
        if rng.random() < 0.5:
            reference = reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            reference = reference.rotate(rng.uniform(-20, 20), Image.BILINEAR)
        if rng.random() < 0.3:
            reference = reference.filter(ImageFilter.BoxBlur(rng.randint(1, 3)))
        tensor = TF.to_dtype(TF.pil_to_tensor(reference), torch.float32, scale=True)
        if rng.random() < 0.3:
            tensor = self.elastic(tensor)
        return TF.normalize(tensor, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def bezier_polygon(box, outer, rng: random.Random, points: int = 18) -> list[tuple]:
    """Each edge of ``box`` bulging towards ``outer`` as a quadratic Bezier, jittered."""
    x0, y0, x1, y1 = box
    ex0, ey0, ex1, ey1 = outer
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    edges = [
        ((x0, y0), (xm, ey0), (x1, y0)),
        ((x1, y0), (ex1, ym), (x1, y1)),
        ((x1, y1), (xm, ey1), (x0, y1)),
        ((x0, y1), (ex0, ym), (x0, y0)),
    ]
    t = np.linspace(0, 1, points, endpoint=False)[:, None]
    polygon = []
    for start, control, end in edges:
        s, c, e = (np.array(p) for p in (start, control, end))
        curve = (1 - t) ** 2 * s + 2 * (1 - t) * t * c + t**2 * e
        curve += np.array([[rng.uniform(-5, 5), rng.uniform(-5, 5)] for _ in range(points)])
        polygon += [tuple(p) for p in curve]
    return polygon


# ----------------------------------------------------------------------------- timing
def cpu_per_sample(fn: Sample, records: list[dict]) -> float:
    """Mean CPU seconds per record of ``fn``, this process, skips included."""
    start = time.process_time()
    for index, record in enumerate(records):
        with contextlib.suppress(SkipSample):
            fn(record, random.Random(f"bench:{index}"))
    return (time.process_time() - start) / len(records)


class BenchStream(IterableDataset):
    """Shards split across workers, ``fn`` per record, batches collated in the worker (as
    ``TrainStream``), each with the CPU time the worker spent making it."""

    def __init__(self, urls: list[str], fn: Sample, batch_size: int) -> None:
        self.urls, self.fn, self.batch_size = urls, fn, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batch, start = [], time.process_time()
        for url in self.urls[worker::workers]:
            for index, record in enumerate(wds.tarfile_samples([{"url": url}])):
                try:
                    batch.append(self.fn(record, random.Random(f"bench:{url}:{index}")))
                except SkipSample:
                    continue
                if len(batch) == self.batch_size:
                    yield self._collate(batch, start)
                    batch, start = [], time.process_time()
        if batch:
            yield self._collate(batch, start)

    @staticmethod
    def _collate(batch: list[dict], start: float) -> dict:
        out = default_collate(batch)
        out["worker_cpu_s"] = torch.tensor(time.process_time() - start)
        out["samples"] = torch.tensor(len(batch))
        return out


def loader_run(urls: list[str], fn: Sample, workers: int, batch_size: int) -> tuple[float, float]:
    """(samples/s, worker CPU s per sample) for one pass over the shards."""
    loader = DataLoader(
        BenchStream(urls, fn, batch_size), batch_size=None, num_workers=workers, prefetch_factor=4
    )
    start, samples, cpu = time.perf_counter(), 0, 0.0
    for batch in loader:
        samples += int(batch["samples"])
        cpu += float(batch["worker_cpu_s"])
    return samples / (time.perf_counter() - start), cpu / samples


def device_times(
    batches: list[dict], masks, augment, device: torch.device, spec: SampleSpec
) -> tuple[float, float]:
    """(decode_batch s, device_transform s) per batch, medians; decode 0 for decoded batches."""
    decode, transform = [], []
    for batch in [batches[0], *batches]:  # the first call of each op is a warm-up
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        synchronize(device)
        start = time.perf_counter()
        if "encoded" in batch:
            batch = decode_batch(batch, spec.resolution, spec.reference_size)
        synchronize(device)
        middle = time.perf_counter()
        device_transform(batch, masks, augment, training=True)
        synchronize(device)
        decode.append(middle - start)
        transform.append(time.perf_counter() - middle)
    return statistics.median(decode[1:]), statistics.median(transform[1:])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PIL_DECODE = "<method 'decode' of 'ImagingDecoder' objects>"
PIL_RESIZE = "<method 'resize' of 'ImagingCore' objects>"
TORCH_RESIZE = "<built-in method torch._ops.aten._upsample_bilinear2d_aa>"
PIL_PASTE = "<method 'paste' of 'ImagingCore' objects>"  # the copy into the kernel's input


def profile_make_sample(records: list[dict], spec: SampleSpec, top: int) -> str:
    """Own time per function, per sample; decode, resize (torch's kernel and PIL's) and the
    copy into the kernel's input summed. The first line is the summary; ``top`` lines follow."""
    profiler = cProfile.Profile()
    profiler.enable()
    cpu_per_sample(lambda r, rng: make_sample(r, spec, rng), records)
    profiler.disable()
    own = {key: row[2] for key, row in pstats.Stats(profiler).stats.items()}  # tottime
    total, scale = sum(own.values()), 1000 / len(records)
    parts = {
        name: sum(t for key, t in own.items() if key[2] == c_call)
        for name, c_call in (
            ("JPEG decode", PIL_DECODE),
            ("torch resize", TORCH_RESIZE),
            ("PIL resize", PIL_RESIZE),
            ("copy to torch", PIL_PASTE),
        )
    }
    parts["everything else"] = total - sum(parts.values())
    lines = [
        "ms/sample: "
        + ", ".join(f"{n} {t * scale:.2f} ({100 * t / total:.0f}%)" for n, t in parts.items()),
        f"{'own time':>9}  {'ms/sample':>9}  function",
    ]
    for (file, line, name), tottime in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        where = f"{Path(file).name}:{line}({name})" if line else name
        lines.append(f"{100 * tottime / total:8.1f}%  {tottime * scale:9.2f}  {where}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def interleaved(repeats: int, measures: dict) -> dict:
    """Median of each measure over ``repeats`` rounds, every round running each one in turn,
    so that load from other users of the machine spreads over all of them alike."""
    results: dict = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            results[name].append(measure())
    return {name: median(values) for name, values in results.items()}


def median(values: list) -> float | tuple:
    if isinstance(values[0], tuple):
        return tuple(statistics.median(column) for column in zip(*values))
    return statistics.median(values)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_cache = Path(tempfile.gettempdir()) / "pbe-bench-throughput"
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--cache", type=Path, default=default_cache)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-samples", type=int, default=200, help="records for CPU timing")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", help="where the batched side runs")
    parser.add_argument("--device-batches", type=int, default=8)
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument(
        "--sizes",
        type=int_list,
        default=None,
        help="photo long sides, px, for the worker CPU comparison by size; default 640,1280,2560 "
        "with --device cpu, none otherwise (a CPU measure: gpu.sh's time goes to the device)",
    )
    parser.add_argument(
        "--size-images", type=int_list, default=[96, 64, 32], help="photos per size, in order"
    )
    parser.add_argument("--size-repeats", type=int, default=5)
    parser.add_argument("--accuracy", type=int, default=8, help="samples a size, float check")
    parser.add_argument(
        "--sizes-only", action="store_true", help="only the per-size worker CPU comparison"
    )
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [640, 1280, 2560] if args.device == "cpu" else []
    if len(args.size_images) < len(args.sizes):
        args.size_images += args.size_images[-1:] * (len(args.sizes) - len(args.size_images))
    return args


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if not args.sizes_only:
        compare_pipelines(args)
    if args.sizes:
        compare_sizes(args)


def compare_sizes(args: argparse.Namespace) -> None:
    """Worker CPU per sample, ``reference`` against ``ours``, on photos of each size."""
    spec = SampleSpec()
    pipelines: dict[str, Sample] = {
        "reference": ReferencePipeline(),
        "ours": lambda r, rng: make_sample(r, spec, rng),
    }
    sets = {}
    for size, count in zip(args.sizes, args.size_images):
        sets[size] = load_records(ensure_shards(args.cache / f"{size}px-{count}", count, size=size))
    torch.set_num_threads(1)  # as in a DataLoader worker
    cpu = interleaved(
        args.size_repeats,
        {
            (size, name): partial(cpu_per_sample, fn, records)
            for size, records in sets.items()
            for name, fn in pipelines.items()
        },
    )
    print(f"\nWorker CPU per sample by photo size (median of {args.size_repeats} rounds):")
    print(
        "\n| photo long side | photos | mean JPEG | reference ms/sample | ours ms/sample | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for size, records in sets.items():
        kilobytes = statistics.mean(len(r["jpg"]) for r in records) / 1024
        ours, reference = cpu[size, "ours"], cpu[size, "reference"]
        print(
            f"| {size} px | {len(records)} | {kilobytes:.0f} kB | {1000 * reference:.2f} "
            f"| {1000 * ours:.2f} | {ours / reference:.3f} |"
        )
    for size in sets:
        ratio = cpu[size, "ours"] / cpu[size, "reference"]
        print(f"worker CPU ratio ours/reference at {size} px: {ratio:.2f}")
    print("\nWhere make_sample's time goes, by photo size (cProfile):")
    for size, records in sets.items():
        print(f"{size} px: " + profile_make_sample(records, spec, 0).splitlines()[0])
    torch.set_num_threads(os.cpu_count() or 1)
    if args.accuracy:
        print(f"\nCrops against float crops of the full-resolution photo ({args.accuracy} a size):")
        for size, records in sets.items():
            print(f"{size} px: " + accuracy(records, spec, args.accuracy))


def accuracy(records: list[dict], spec: SampleSpec, count: int) -> str:
    """How ``make_sample``'s crops differ from PIL's box filter computed in float on the full
    decode: mean abs difference (of 255), and offset in output pixels (least squares on the
    gradients); with how many records decode at a DCT scale and crops fall back to PIL."""
    scaled, errors, offsets, fallbacks, crops = 0, [], [], 0, 0
    kernel = crop_resize.torch_crop_resize

    def counted(*args: object) -> torch.Tensor | None:
        nonlocal fallbacks, crops
        out = kernel(*args)
        crops, fallbacks = crops + 1, fallbacks + (out is None)
        return out

    crop_resize.torch_crop_resize = counted
    try:
        for index, record in enumerate(records[:count]):
            sample = make_sample(record, spec, random.Random(f"bench:{index}"))
            geometry, turn = draws(record, spec, random.Random(f"bench:{index}"))
            scaled += decode_scale(open_image(record["jpg"], spec), geometry, spec) > 1
            full = Image.open(io.BytesIO(record["jpg"])).convert("RGB")
            pixels = np.asarray(full.transpose(DISPLAY_TRANSPOSE[turn]) if turn > 1 else full)
            for key, box in (("image", geometry.crop), ("reference", geometry.reference_box)):
                ours = sample[key].numpy().astype(np.float64)
                exact = float_crop(pixels, box, ours.shape[-1])
                errors.append(np.abs(ours - exact).mean())
                offsets.append(offset(ours, exact))
    finally:
        crop_resize.torch_crop_resize = kernel
    return (
        f"mean abs difference {statistics.mean(errors):.2f} (max {max(errors):.2f}), "
        f"offset {statistics.mean(offsets):.3f} px (max {max(offsets):.3f}); "
        f"{scaled}/{min(count, len(records))} decoded at a DCT scale, "
        f"{fallbacks}/{crops} crops by PIL"
    )


def draws(record: dict, spec: SampleSpec, rng: random.Random):
    """``make_sample``'s crop geometry and EXIF orientation for ``record`` (same draws)."""
    boxes = [tuple(b) for b in json.loads(record["json"])["boxes"]]
    image = open_image(record["jpg"], spec)
    turn = orientation(image)
    width, height = samples.displayed_size(image, turn)
    box = samples._choose(boxes, width, height, spec, rng)
    return spec.crop_sampler(box, width, height, rng), turn


def float_crop(pixels: np.ndarray, box: tuple, size: int) -> np.ndarray:
    """(3, size, size): PIL's bilinear ``resize(box=box)`` (a triangle filter as wide as the
    scale when shrinking) in float64, with no rounding."""
    height, width = pixels.shape[:2]
    down, across = (triangle(n, box[i], box[i + 2], size) for i, n in ((1, height), (0, width)))
    rows, columns = np.flatnonzero(down.any(0)), np.flatnonzero(across.any(0))
    region = pixels[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1].astype(np.float64)
    down, across = down[:, rows[0] : rows[-1] + 1], across[:, columns[0] : columns[-1] + 1]
    return np.stack([down @ region[..., c] @ across.T for c in range(3)])


def triangle(length: int, start: float, end: float, size: int) -> np.ndarray:
    scale = (end - start) / size
    radius = max(scale, 1.0)
    weights = np.zeros((size, length))
    for i in range(size):
        center = start + (i + 0.5) * scale
        lo, hi = max(int(center - radius + 0.5), 0), min(int(center + radius + 0.5), length)
        taps = np.clip(1 - np.abs((np.arange(lo, hi) - center + 0.5) / radius), 0, None)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


def offset(ours: np.ndarray, exact: np.ndarray) -> float:
    """The larger of the x and y offsets of ``ours`` from ``exact``, in output pixels."""
    grey = exact.mean(0)
    gy, gx = (g[2:-2, 2:-2].ravel() for g in np.gradient(grey))
    difference = (ours.mean(0) - grey)[2:-2, 2:-2].ravel()
    offsets, *_ = np.linalg.lstsq(np.stack([gx, gy], 1), difference, rcond=None)
    return float(np.abs(offsets).max())


def compare_pipelines(args: argparse.Namespace) -> None:
    """The three pipelines on the 640-1024 px set: CPU, loaders, device side, profile."""
    device = torch.device(args.device)
    shards = ensure_shards(args.cache / f"{args.images}", args.images)
    records = load_records(shards)
    kilobytes = statistics.mean(len(r["jpg"]) for r in records) / 1024
    print(f"{len(records)} records in {len(shards)} shards, mean JPEG {kilobytes:.0f} kB")
    cfg = load_data_config("paper", "paper")
    masks, augment = instantiate(cfg.mask), instantiate(cfg.augment).to(device)
    spec = SampleSpec()
    device_spec = replace(spec, decode_on_device=True)
    pipelines: dict[str, Sample] = {
        "reference": ReferencePipeline(),
        "ours": lambda r, rng: make_sample(r, spec, rng),
        "ours-device": lambda r, rng: make_sample(r, device_spec, rng),
    }

    torch.set_num_threads(1)  # as in a DataLoader worker
    subset = records[: args.cpu_samples]
    cpu = interleaved(
        args.repeats, {name: partial(cpu_per_sample, fn, subset) for name, fn in pipelines.items()}
    )
    torch.set_num_threads(os.cpu_count() or 1)
    device_side = interleaved(
        args.repeats,
        {
            name: partial(
                device_times,
                first_batches(shards, pipelines[name], args),
                masks,
                augment,
                device,
                spec,
            )
            for name in ("ours", "ours-device")
        },
    )
    loaders = interleaved(
        args.repeats,
        {
            (name, w): partial(loader_run, shards, fn, w, args.batch_size)
            for name, fn in pipelines.items()
            for w in args.workers
        },
    )
    print_results(args, cpu, loaders, device_side, device)
    print(f"\ncProfile of make_sample ({len(subset)} records, top by own time):")
    torch.set_num_threads(1)  # as in a DataLoader worker
    print(profile_make_sample(subset, spec, args.profile_top))
    torch.set_num_threads(os.cpu_count() or 1)


def print_results(
    args: argparse.Namespace,
    cpu: dict[str, float],
    loaders: dict[tuple[str, int], tuple[float, float]],
    device_side: dict[str, tuple[float, float]],
    device: torch.device,
) -> None:
    """A markdown table (what bench/README.md shows) and the CPU-time ratios."""
    header = ["pipeline", "CPU ms/sample (1 process)"]
    header += [f"samples/s, {w} worker(s) [worker CPU ms/sample]" for w in args.workers]
    header.append(f"device side, ms per batch of {args.batch_size} ({device.type})")
    print("\n| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for name in cpu:
        cells = [f"{1000 * cpu[name]:.2f}"]
        cells += [
            f"{loaders[name, w][0]:.1f} [{1000 * loaders[name, w][1]:.1f}]" for w in args.workers
        ]
        cells.append(device_cell(device_side.get(name)))
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name in ("ours", "ours-device"):
        print(
            f"ratio {name} / reference, worker CPU per sample: "
            f"{cpu[name] / cpu['reference']:.3f} (1/{cpu['reference'] / cpu[name]:.1f})"
        )


def first_batches(shards: list[str], fn: Sample, args: argparse.Namespace) -> list[dict]:
    return list(BenchStream(shards[:1], fn, args.batch_size))[: args.device_batches]


def device_cell(times: tuple[float, float] | None) -> str:
    if times is None:
        return "none: all per sample in the worker"
    decode, transform = times
    cell = f"{1000 * transform:.0f} device_transform"
    return cell + (f" + {1000 * decode:.0f} decode_batch" if decode else "")


if __name__ == "__main__":
    main(sys.argv[1:])
