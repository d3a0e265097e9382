"""Data-loading cost: the public Paint-by-Example per-sample CPU pipeline against ours.

    python bench/data_throughput.py                 # CPU: everything, ~5 min on 2 cores
    python bench/data_throughput.py --device cuda   # the batched device side on a GPU

Generates (once, cached) ``--images`` synthetic photo-like JPEGs of 640-1024 px with boxes in
the shard contract, then measures in one run:

- CPU time per sample of the per-sample work, single process, one torch thread (what each
  DataLoader worker runs with): ``reference`` (public code: full decode, full-image float
  tensor and mask, crop, resize, per-sample flip/rotate/blur/elastic of the reference),
  ``ours`` (``make_sample``: draft decode, crop and resize, uint8 out) and ``ours-device``
  (``make_sample`` with ``decode_on_device``: json + header only, JPEG bytes out);
- samples/s through a DataLoader with 1 and 2 workers (batches collated in the worker, as
  ``TrainStream`` does), with the CPU time the workers spent per sample;
- the batched device side per batch: ``device_transform`` (masks + Kornia augmentation) and,
  for ``ours-device``, ``decode_batch`` (decode, orient, crop, resize), on ``--device``;
- a cProfile of ``make_sample``: where our remaining worker time goes.

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
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pbe_lightning.data.crops import BoxFilter, CropSampler, choose_box
from pbe_lightning.data.datamodule import device_transform
from pbe_lightning.data.device_decode import decode_batch
from pbe_lightning.data.inspect import load_data_config
from pbe_lightning.data.samples import SampleSpec, SkipSample, make_sample

DATA_VERSION = 1
PER_SHARD = 100
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Sample = Callable[[dict, random.Random], dict]


# ----------------------------------------------------------------------------- data
def ensure_shards(root: Path, images: int, seed: int = 0) -> list[str]:
    """Synthetic photo-like JPEGs in shards, generated once per (version, count, seed)."""
    manifest = {"version": DATA_VERSION, "images": images, "seed": seed}
    shards = [str(root / f"bench-{i:04d}.tar") for i in range(math.ceil(images / PER_SHARD))]
    done = root / "manifest.json"
    if done.is_file() and json.loads(done.read_text()) == manifest:
        return shards
    root.mkdir(parents=True, exist_ok=True)
    print(f"generating {images} images into {root} (once)", flush=True)
    for number, shard in enumerate(shards):
        with wds.TarWriter(shard) as sink:
            for index in range(number * PER_SHARD, min(images, (number + 1) * PER_SHARD)):
                jpeg, boxes = synthetic_photo(np.random.default_rng([seed, index]))
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
        return TF.normalize(tensor, CLIP_MEAN, CLIP_STD)


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


def profile_make_sample(records: list[dict], spec: SampleSpec, top: int) -> str:
    """Own time per function, per sample; decode and resize (the two PIL C calls) summed."""
    profiler = cProfile.Profile()
    profiler.enable()
    cpu_per_sample(lambda r, rng: make_sample(r, spec, rng), records)
    profiler.disable()
    own = {key: row[2] for key, row in pstats.Stats(profiler).stats.items()}  # tottime
    total, scale = sum(own.values()), 1000 / len(records)
    decode = sum(t for key, t in own.items() if key[2] == PIL_DECODE)
    resize = sum(t for key, t in own.items() if key[2] == PIL_RESIZE)
    rest = total - decode - resize
    lines = [
        f"JPEG decode {decode * scale:.2f} ms/sample ({100 * decode / total:.0f}%), "
        f"PIL resize {resize * scale:.2f} ({100 * resize / total:.0f}%), "
        f"everything else {rest * scale:.2f} ({100 * rest / total:.0f}%)",
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
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
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
    print(profile_make_sample(subset, spec, args.profile_top))


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
