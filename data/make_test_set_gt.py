"""Build ``test_set_GT``, the FID reference set of the COCOEE evaluation, from COCO test2017.

    python data/make_test_set_gt.py --images test2017 --out test_set_GT [--workers 8]

Each image is resized so its shorter side is 512 and centre-cropped to 512x512, as the public
script did it (torchvision ``Resize(512)`` then ``CenterCrop(512)`` on the PIL image), and
written as ``<file stem>.png``. Resampling: bilinear, torchvision's default for ``Resize``,
which on a PIL image is PIL's antialiased bilinear filter; the longer side becomes
``int(512 * long / short)`` and the crop's offset ``round((side - 512) / 2)`` (Python's
rounding, half to even), as torchvision computes them. Written with PIL alone, that same
arithmetic, so the command (and each worker) starts without importing torch. Like the public script, EXIF
orientation is not applied and grey images stay grey (CLIP's preprocessing makes them RGB);
images in other modes (CMYK, palette, alpha) are converted to RGB, which PNG can store.

Resumable: existing outputs are kept (each is written to a temporary file and renamed), so an
interrupted run continues where it stopped. Unreadable images are skipped and listed.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
KEPT_MODES = ("RGB", "L")


def centre_square(image: Image.Image, size: int) -> Image.Image:
    """The public script's transform: shorter side to ``size`` (bilinear), centre crop."""
    width, height = image.size
    long = int(size * max(width, height) / min(width, height))
    resized = (size, long) if width <= height else (long, size)
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BILINEAR)
    left, top = (int(round((side - size) / 2.0)) for side in resized)
    return image.crop((left, top, left + size, top + size))


def make_square(source: Path, target: Path, size: int) -> str:
    """Write ``target`` from ``source``; returns ``written``, ``kept`` or ``unreadable: why``."""
    if target.is_file():
        return "kept"
    try:
        with Image.open(source) as image:
            image.load()
            if image.mode not in KEPT_MODES:
                image = image.convert("RGB")
            square = centre_square(image, size)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return f"unreadable: {' '.join(str(error).split())}"
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    square.save(partial, format="PNG")
    partial.replace(target)
    return "written"


def build_test_set_gt(images: Path, out: Path, size: int = 512, workers: int = 1) -> dict:
    """Square every image of ``images`` into ``out``; returns the counts and the unreadable."""
    sources = sorted(p for p in images.iterdir() if p.suffix.lower() in SUFFIXES)
    if not sources:
        raise FileNotFoundError(f"no images ({', '.join(sorted(SUFFIXES))}) in {images}")
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / f"{source.stem}.png" for source in sources]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            done = pool.map(make_square, sources, targets, [size] * len(sources), chunksize=64)
            results = list(tqdm(done, total=len(sources)))
    else:
        pairs = tqdm(zip(sources, targets), total=len(sources))
        results = [make_square(source, target, size) for source, target in pairs]
    summary = {"written": 0, "kept": 0, "unreadable": {}}
    for source, result in zip(sources, results):
        if result.startswith("unreadable"):
            summary["unreadable"][source.name] = result.removeprefix("unreadable: ")
        else:
            summary[result] += 1
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, type=Path, help="COCO test2017 folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder (test_set_GT)")
    parser.add_argument("--size", type=int, default=512, help="square side (paper: 512)")
    parser.add_argument("--workers", type=int, default=1, help="processes")
    args = parser.parse_args(argv)
    try:
        summary = build_test_set_gt(args.images, args.out, args.size, args.workers)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"make_test_set_gt: --images {args.images}: {error}") from None
    for name, why in summary["unreadable"].items():
        print(f"skipped {name}: {why}")
    print(
        f"{args.out}: {summary['written']} written, {summary['kept']} already there, "
        f"{len(summary['unreadable'])} unreadable skipped"
    )


if __name__ == "__main__":
    main()
