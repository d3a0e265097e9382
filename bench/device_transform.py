"""Per-batch cost of ``device_transform`` (masks + augmentation): the Kornia-sequential
implementation it replaced (OLD) against the current one (NEW), in one process.

    OMP_NUM_THREADS=1 python -m bench.device_transform            # CPU, one thread
    python -m bench.device_transform --device cuda --rounds 9

A batch of 16 at 512 px (reference 224), uint8 as the loader delivers it, masks from
``conf/data/mask/paper.yaml`` and the augmentation of ``conf/data/augment/paper.yaml`` and
``strong.yaml`` (composed by Hydra as training does). OLD is a private copy of an earlier
design: :class:`KorniaSequentialAugment` (one Kornia op after another in an
``AugmentationSequential``, at the config's probabilities, with that design's ops: Gaussian
blur, black borders, Kornia's elastic field without the affine part; a cost baseline, not the
same distribution as NEW) and :class:`SearchsortedMaskGenerator` (the previous polygon fill).
Every round times OLD and NEW in turn (the order alternating between rounds, same seed for
both) so that load from other users of the machine hits them alike; the table shows medians
over the rounds. The op counts are ATen ops dispatched per call (a proxy for kernel launches on
a GPU) and, among them, the ones that make the host wait for an accelerator (``nonzero``,
``.item()``, ...). NEW takes another path on an accelerator (no subsets, no host syncs); on a
CPU its accelerator-path count is shown as well.
"""

# ruff: noqa: E402  (OMP_NUM_THREADS has to be set before torch is imported)
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread, as a loader worker

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pbe_lightning.data import augment as augment_module
from pbe_lightning.data import masks as masks_module
from pbe_lightning.data.datamodule import device_transform
from pbe_lightning.data.masks import EDIT, KEEP, bezier_outline, pixel_centres
from pbe_lightning.data.shard_report import load_data_config

PRESETS = ("paper", "strong")
# ATen ops that copy a device value to the host (the host waits for the device there).
HOST_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "_unique2"}
BOOLEAN_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


# ----------------------------------------------------------------------------- OLD (a copy)
# The config values the Kornia baseline takes (the others are NEW's recipe, not Kornia's).
KORNIA_KEYS = (
    "hflip", "rotation", "rotation_degrees", "blur", "elastic", "color_jitter", "color_strength",
    "perspective", "scene_hflip",
)  # fmt: skip


class KorniaSequentialAugment(nn.Module):
    """An earlier ``Augment``: Kornia ops one after another, one warp per geometric op."""

    def __init__(
        self,
        hflip: float = 0.5,
        rotation: float = 0.5,
        rotation_degrees: float = 20.0,
        blur: float = 0.3,
        elastic: float = 0.3,
        color_jitter: float = 0.0,
        color_strength: float = 0.2,
        perspective: float = 0.0,
        scene_hflip: float = 0.0,
        blur_kernel: int = 7,
        elastic_kernel: int = 63,
        elastic_sigma: float = 32.0,
        elastic_alpha: float = 1.0,
    ) -> None:
        super().__init__()
        ops: list[nn.Module] = []
        if hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=hflip))
        if rotation > 0:
            ops.append(K.RandomRotation(degrees=rotation_degrees, p=rotation))
        if perspective > 0:
            ops.append(K.RandomPerspective(distortion_scale=0.3, p=perspective))
        if color_jitter > 0:
            s = color_strength
            ops.append(K.ColorJitter(s, s, s, s / 4, p=color_jitter))
        if blur > 0:
            sigma = (0.1, max(0.2, blur_kernel / 3))
            ops.append(K.RandomGaussianBlur((blur_kernel, blur_kernel), sigma, p=blur))
        if elastic > 0:
            kernel = (elastic_kernel, elastic_kernel)
            sigma = (elastic_sigma, elastic_sigma)
            alpha = (elastic_alpha, elastic_alpha)
            ops.append(K.RandomElasticTransform(kernel, sigma, alpha, p=elastic))
        self.reference_ops = K.AugmentationSequential(*ops) if ops else None
        self.scene_ops = (
            K.AugmentationSequential(
                K.RandomHorizontalFlip(p=scene_hflip), data_keys=["input", "mask"]
            )
            if scene_hflip > 0
            else None
        )

    def reference(self, reference: torch.Tensor, generator=None) -> torch.Tensor:
        # ``generator`` unused: Kornia draws from the global generators.
        if self.reference_ops is None:
            return reference
        return self.reference_ops(reference).clamp(0, 1)

    def scene(
        self, image: torch.Tensor, mask: torch.Tensor, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scene_ops is None:
            return image, mask
        image, mask = self.scene_ops(image, mask)
        return image, mask


def old_box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    centres = pixel_centres(size, boxes.device)
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    inside_x = (centres >= x0) & (centres < x1)
    inside_y = (centres >= y0) & (centres < y1)
    hole = inside_y[:, :, None] & inside_x[:, None, :]
    return torch.where(hole, EDIT, KEEP)[:, None]


def old_polygon_masks(polygons: torch.Tensor, size: int) -> torch.Tensor:
    """The previous fill: sorted crossings per row, a search for every pixel."""
    centres = pixel_centres(size, polygons.device)
    start, end = polygons, torch.roll(polygons, shifts=-1, dims=1)
    sy, ey = start[..., 1][:, None, :], end[..., 1][:, None, :]
    sx, ex = start[..., 0][:, None, :], end[..., 0][:, None, :]
    rows = centres[None, :, None]
    crosses = (sy > rows) != (ey > rows)
    safe_dy = torch.where(ey == sy, torch.ones_like(ey), ey - sy)
    x_cross = sx + (rows - sy) * (ex - sx) / safe_dy
    x_cross = torch.where(crosses, x_cross, torch.full_like(x_cross, float("inf")))
    x_cross, _ = torch.sort(x_cross, dim=-1)
    columns = centres[None, None, :].expand(polygons.shape[0], size, size).contiguous()
    left_crossings = torch.searchsorted(x_cross.contiguous(), columns)
    return torch.where(left_crossings % 2 == 1, EDIT, KEEP)[:, None]


@dataclass
class SearchsortedMaskGenerator:
    """The previous ``MaskGenerator``: every polygon filled, then chosen per sample."""

    irregular_prob: float = 0.5
    points_per_edge: int = 18
    jitter: float = 0.01

    def __call__(
        self, object_boxes, mask_boxes, size, generator=None, crop_px=None, outline_keep=None
    ):  # crop_px, outline_keep: the current generator's inputs, unused by the old one
        rect = old_box_masks(mask_boxes, size)
        if self.irregular_prob == 0:
            return rect
        polygons = bezier_outline(
            object_boxes, mask_boxes, self.points_per_edge, self.jitter, generator
        )
        irregular = old_polygon_masks(polygons, size)
        draw = torch.rand(object_boxes.shape[0], generator=generator, device=rect.device)
        return torch.where((draw < self.irregular_prob)[:, None, None, None], irregular, rect)


# ----------------------------------------------------------------------------- harness
def make_batch(batch: int, resolution: int, reference: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    centre = torch.rand(batch, 2, generator=g) * 0.4 + 0.3
    half = torch.rand(batch, 2, generator=g) * 0.15 + 0.08
    boxes = torch.cat([centre - half, centre + half], 1)
    grow = torch.rand(batch, 4, generator=g) * 0.1
    mask_boxes = torch.cat([boxes[:, :2] - grow[:, :2], boxes[:, 2:] + grow[:, 2:]], 1)
    out = {
        "image": torch.randint(0, 256, (batch, 3, resolution, resolution), generator=g),
        "reference": torch.randint(0, 256, (batch, 3, reference, reference), generator=g),
        "object_box": boxes,
        "mask_box": mask_boxes.clamp(0, 1),
    }
    return {
        k: v.to(device) if k in ("object_box", "mask_box") else v.to(torch.uint8).to(device)
        for k, v in out.items()
    }


def implementations(preset: str) -> dict[str, tuple]:
    cfg = load_data_config("paper", preset)
    # The old generator takes the keys it had (the current one has more: outline, edge, ...).
    old_mask_keys = ("irregular_prob", "points_per_edge", "jitter")
    mask_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.mask).items() if k in old_mask_keys}
    augment_kwargs = {
        k: v for k, v in OmegaConf.to_container(cfg.augment).items() if k != "_target_"
    }
    return {
        "old": (
            SearchsortedMaskGenerator(**mask_kwargs),
            KorniaSequentialAugment(**{k: augment_kwargs[k] for k in KORNIA_KEYS}),
        ),
        "new": (instantiate(cfg.mask), instantiate(cfg.augment)),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats * 1000


class CountOps(TorchDispatchMode):
    """ATen ops dispatched from Python code, and those among them that wait for the device.

    Indexing with a boolean mask counts as a sync: it has to know how many are true.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in HOST_SYNCS or (name in BOOLEAN_INDEXING and boolean_index(args)):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def boolean_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


@contextmanager
def accelerator_path():
    saved = augment_module.SUBSET_DEVICES, masks_module.SUBSET_DEVICES
    augment_module.SUBSET_DEVICES = masks_module.SUBSET_DEVICES = ()
    try:
        yield
    finally:
        augment_module.SUBSET_DEVICES, masks_module.SUBSET_DEVICES = saved


def count_ops(fn: Callable[[], object], seed: int = 0) -> tuple[int, int]:
    torch.manual_seed(seed)
    with CountOps() as counter:
        fn()
    return counter.ops, counter.syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median); >= 5")
    parser.add_argument("--repeats", type=int, default=2, help="batches per timing")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--reference-size", type=int, default=224)
    parser.add_argument("--no-counts", action="store_true", help="skip the op counts")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    batch = make_batch(args.batch, args.resolution, args.reference_size, device)
    image = batch["image"].float() / 127.5 - 1
    reference = batch["reference"].float() / 255
    runs = {preset: implementations(preset) for preset in PRESETS}

    def part(name: str, preset: str, impl: str) -> Callable[[], object]:
        masks, augment = runs[preset][impl]
        if name == "device_transform":
            return lambda: device_transform(batch, masks, augment, training=True)
        if name == "masks":
            return lambda: masks(batch["object_box"], batch["mask_box"], args.resolution)
        mask = torch.ones_like(image[:, :1])
        return lambda: (augment.scene(image, mask), augment.reference(reference))

    parts = ("device_transform", "masks", "augment")
    keys = [
        (name, preset)
        for preset in PRESETS
        for name in parts
        if (name, preset) != ("masks", "strong")
    ]
    for name, preset in keys:  # warm-up: caches, lazy kernels, allocator
        for impl in ("old", "new"):
            torch.manual_seed(0)
            part(name, preset, impl)()
    times = {(key, impl): [] for key in keys for impl in ("old", "new")}
    for round_ in range(max(args.rounds, 1)):
        order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
        for key in keys:
            for impl in order:
                torch.manual_seed(round_)
                elapsed = time_once(part(*key, impl), device, args.repeats)
                times[key, impl].append(elapsed)
    median = {key: statistics.median(values) for key, values in times.items()}

    print(
        f"\nbatch {args.batch}, image {args.resolution} px, reference {args.reference_size} px, "
        f"masks paper, on {device} (torch threads {torch.get_num_threads()}), ms per batch, "
        f"median of {args.rounds} rounds x {args.repeats} batches\n"
    )
    print("| what | augment | old ms | new ms | speed-up |")
    print("|---|---|---|---|---|")
    for name, preset in keys:
        old, new = median[(name, preset), "old"], median[(name, preset), "new"]
        what = {
            "device_transform": "**device_transform**",
            "masks": "masks (MaskGenerator)",
            "augment": "scene() + reference()",
        }[name]
        shown = "-" if name == "masks" else preset
        print(f"| {what} | {shown} | {old:.1f} | {new:.1f} | {old / new:.1f}x |")

    if not args.no_counts:
        print("\nATen ops per device_transform call [of which wait for the device] (same seed):\n")
        header = "| augment | old | new |"
        rule = "|---|---|---|"
        if device.type == "cpu":
            header += " new, accelerator path |"
            rule += "---|"
        print(header)
        print(rule)
        for preset in PRESETS:
            cells = []
            for impl in ("old", "new"):
                ops, syncs = count_ops(part("device_transform", preset, impl))
                cells.append(f"{ops} [{syncs}]")
            if device.type == "cpu":
                with accelerator_path():
                    ops, syncs = count_ops(part("device_transform", preset, "new"))
                cells.append(f"{ops} [{syncs}]")
            print(f"| {preset} | " + " | ".join(cells) + " |")

    old = median[("device_transform", "paper"), "old"]
    new = median[("device_transform", "paper"), "new"]
    print(
        f"\ndevice transform, {args.resolution} px batch {args.batch}: "
        f"old {old:.1f} ms, new {new:.1f} ms"
    )


if __name__ == "__main__":
    main()
