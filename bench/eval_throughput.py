"""Painting throughput of evaluate.py per precision and memory layout (and thread count).

    python -m bench.eval_throughput                                   # tiny model, 64 px, CPU
    python -m bench.eval_throughput --arch sd15 --resolution 128 --steps 2 --batch 1 --rounds 3 \\
        --precisions fp32                                             # SD size on a CPU
    python -m bench.eval_throughput --arch sd15 --device cuda --resolution 512 --steps 10 \\
        --batch 8 --threads 0 --compile                               # a GPU: every side

Paints one chunk exactly as evaluate.py does (``module.paint`` with PLMS and guidance 5 under
``inference.painting_precision``, after ``inference.speed_up``) with random weights of the real
classes: speed does not depend on their values. Sides: every precision (fp16, the paper's;
bf16; fp32) with and without channels-last (and compiled, with ``--compile``), at each
``--threads`` count (torch's intra-op threads, what ``OMP_NUM_THREADS`` sets; 0 leaves it).
All sides run in one process, in turn within each round, so that load from other users of the
machine hits them alike; each number is the median over ``--rounds`` rounds after one warm-up
chunk per side. Prints seconds per edit, edits per hour and the ratio to fp32 at that thread
count; a full COCOEE run is 3,500 edits of 50 steps, so one edit there takes about
``50 / --steps`` times the seconds per edit printed here, plus the VAE and CLIP share.
Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from bench.train_throughput import build, fake_batch
from pbe_lightning.inference import PRECISIONS, painting_precision


def set_layout(module: torch.nn.Module, channels_last: bool) -> None:
    """UNet and VAE in channels-last (``inference.speed_up``) or back in the default layout."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    module.unet.to(memory_format=layout)
    module.vae.to(memory_format=layout)


def paint_chunk(module, batch: dict, steps: int, precision: str, device: torch.device) -> float:
    """Seconds to paint one chunk (the device synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    generator = torch.Generator(device).manual_seed(0)
    with painting_precision(device, precision):
        module.paint(batch, steps, 5.0, "pndm", generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def sides(
    threads: list[int], precisions: list[str], compiled: bool
) -> list[tuple[int, str, bool, bool]]:
    """(threads, precision, channels_last, compiled) for every side to time."""
    layouts = [(False, False), (True, False)] + ([(False, True)] if compiled else [])
    return [(t, p, cl, c) for t, p, (cl, c) in itertools.product(threads, precisions, layouts)]


def measure(args: argparse.Namespace) -> dict[tuple, list[float]]:
    device = torch.device(args.device)
    module = build(args.arch, checkpointing=False).to(device).eval()
    compiled_unet = None
    batch = fake_batch(args.batch, args.resolution, module.encoder.image_size, device)
    timings: dict[tuple, list[float]] = {}
    eager_unet = module.unet
    todo = sides(args.threads, args.precisions, args.compile)
    for round_number in range(args.rounds + 1):  # round 0: warm-up, not counted
        for side in todo:
            threads, precision, channels_last, compiled = side
            if threads:
                torch.set_num_threads(threads)
            set_layout(module, channels_last)
            if compiled and compiled_unet is None:
                compiled_unet = torch.compile(eager_unet)
            module.unet = compiled_unet if compiled else eager_unet
            seconds = paint_chunk(module, batch, args.steps, precision, device)
            if round_number:
                timings.setdefault(side, []).append(seconds / args.batch)
        print(f"round {round_number}/{args.rounds} done", flush=True)
    return timings


def report(timings: dict[tuple, list[float]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.arch}, {args.resolution} px, {args.steps} PLMS steps with guidance, chunks of "
        f"{args.batch}, {args.device}; medians of {args.rounds} rounds\n"
    )
    print("| threads | precision | channels_last | compiled | s/edit | edits/h | vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for side, values in timings.items():
        threads, precision, channels_last, compiled = side
        median = statistics.median(values)
        base = timings.get((threads, "fp32", False, False))
        ratio = f"{median / statistics.median(base):.2f}x" if base else ""
        print(
            f"| {threads or 'default'} | {precision} | {channels_last} | {compiled} | "
            f"{median:.3f} | {3600 / median:.0f} | {ratio} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per chunk")
    parser.add_argument("--batch", type=int, default=2, help="edits per chunk (batch_size)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", default="1,2", help="torch threads per side, comma-separated; 0: leave"
    )
    parser.add_argument(
        "--precisions",
        default=",".join(PRECISIONS),
        help="comma-separated (default: all); 16-bit autocast is ~20x slower than fp32 on CPUs "
        "without native 16-bit math (AVX2): leave it out there at SD size",
    )
    parser.add_argument("--compile", action="store_true", help="also time a compiled UNet")
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    args.precisions = args.precisions.split(",")
    unknown = set(args.precisions) - set(PRECISIONS)
    if unknown:
        parser.error(f"--precisions: {sorted(unknown)} unknown; use {', '.join(PRECISIONS)}")
    with torch.no_grad():
        report(measure(args), args)


if __name__ == "__main__":
    main()
