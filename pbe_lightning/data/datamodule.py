"""WebDataset DataModule: shards in, batches in the model's contract out.

Batch contract after ``on_after_batch_transfer`` (i.e. on the accelerator):
``image`` (B,3,R,R) in [-1, 1]; ``mask`` (B,1,R,R) with KEEP=1 / EDIT=0;
``masked_image`` = image * mask; ``reference`` (B,3,S,S) in [0, 1], augmented when training
(the encoder applies its own CLIP normalisation, since that belongs to the encoder).
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import braceexpand
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from pbe_lightning.batch_seeds import SEEDS_KEY, BatchSeeds, batch_generator
from pbe_lightning.data.augment import Augment
from pbe_lightning.data.crops import BoxFilter, CropSampler
from pbe_lightning.data.device_decode import decode_batch, is_encoded
from pbe_lightning.data.masks import MaskGenerator
from pbe_lightning.data.remote import check_schemes, is_local
from pbe_lightning.data.samples import SKIP_REASONS, SampleSpec, SkipSample, make_sample
from pbe_lightning.data.stream import (
    EpochOfBatches,
    StreamPlace,
    StreamPosition,
    StreamState,
    TrainStream,
)
from pbe_lightning.shutdown import make_worker_deaf
from pbe_lightning.stops import RunStopped


def expand_urls(shards: str | Sequence[str]) -> list[str]:
    """Brace patterns (``a-{000..009}.tar``), globs, or a list of either -> shard URLs."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(str(pattern)):
            is_glob = any(c in url for c in "*?[") and is_local(url)
            urls.extend(sorted(glob.glob(os.path.expanduser(url))) if is_glob else [url])
    return urls


def check_local_shards(urls: list[str], option: str) -> None:
    if not urls:
        raise FileNotFoundError(
            f"{option} matches no shards: pass {option}='/path/train-{{000000..000099}}.tar'"
        )
    check_schemes(urls, option)
    missing = [u for u in urls if is_local(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards in {option} do not exist, e.g. {missing[0]}: "
            f"fix the path or pattern ({option}=...), or train on the demo data with data=demo"
        )


def stacked(samples: list[dict], key: str) -> torch.Tensor | None:
    """The samples' ``key`` tensors as one batch, or None when the loader did not make them."""
    if any(key not in sample for sample in samples):
        return None
    return torch.stack([sample[key] for sample in samples])


class PreviewSet(Dataset):
    """The first ``count`` usable samples of some shards, decoded once with fixed masks.

    Validation only needs a loss and a picture; a small in-memory map-style set gives every
    rank the same number of batches (Lightning pads it with a DistributedSampler) and the
    same pictures every epoch.
    """

    def __init__(
        self,
        urls: list[str],
        spec: SampleSpec,
        masks: MaskGenerator,
        count: int,
        seed: int,
        source_timeout_s: float = 120.0,
    ) -> None:
        stream = TrainStream(urls, spec, batch_size=1, seed=seed, source_timeout_s=source_timeout_s)
        records = stream.source(0, 1, torch.zeros(len(SKIP_REASONS), dtype=torch.long))
        samples: list[dict] = []
        for index, record in enumerate(records):
            if len(samples) == count or index >= 50 * count:
                break
            try:
                samples.append(make_sample(record, spec, random.Random(f"preview:{seed}:{index}")))
            except SkipSample:
                continue
        if not samples:
            raise RunStopped(
                f"no usable sample among the first {50 * count} records of {urls[:3]}: the data "
                "is broken; check data.val_shards (else data.shards) and the skip warnings"
            )
        generator = torch.Generator().manual_seed(seed)
        boxes = torch.stack([s["object_box"] for s in samples])
        mask_boxes = torch.stack([s["mask_box"] for s in samples])
        mask = masks(
            boxes,
            mask_boxes,
            spec.resolution,
            generator=generator,
            crop_px=stacked(samples, "crop_px"),
            outline_keep=stacked(samples, "outline_keep"),
        )
        for sample, sample_mask in zip(samples, mask):
            sample["mask"] = sample_mask
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


class PaintByExampleDataModule(L.LightningDataModule):
    def __init__(
        self,
        shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        resolution: int = 512,
        reference_size: int = 224,
        batches_per_epoch: int = 1000,
        val_samples: int = 16,
        shuffle_buffer: int = 256,
        seed: int = 0,
        box_filter: BoxFilter | None = None,
        crop: CropSampler | None = None,
        max_upscale: float = 4.0,
        mask: MaskGenerator | None = None,
        augment: Augment | None = None,
        pin_memory: bool = True,
        decode_on_device: bool = False,
        sampling: str = "resampled",
        max_json_bytes: int = 1 << 20,
        max_boxes: int = 1000,
        source_timeout_s: float = 120.0,
        skip_ledger: str | None = None,
    ) -> None:
        super().__init__()
        self.skip_ledger = skip_ledger
        self.sampling = sampling
        self.source_timeout_s = source_timeout_s
        self.shards, self.val_shards = shards, val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.batches_per_epoch = batches_per_epoch
        self.val_samples = val_samples
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.spec = SampleSpec(
            resolution,
            reference_size,
            box_filter or BoxFilter(),
            crop or CropSampler(),
            max_upscale,
            decode_on_device=decode_on_device,
            max_json_bytes=max_json_bytes,
            max_boxes=max_boxes,
        )
        self.masks = mask or MaskGenerator()
        self.augment = augment or Augment()
        self.pin_memory = pin_memory
        self._train_loader: EpochOfBatches | None = None
        self._position = StreamPosition()  # where this rank's streams resume
        self._next_batch = 0
        self._streams: list[dict | None] = [None] * max(1, num_workers)
        self._in_transfer: StreamState | None = None

    def setup(self, stage: str | None = None) -> None:
        if not self.shards:
            raise ValueError(
                "data.shards is not set: pass data.shards='/data/train-{000000..000999}.tar' "
                "(a brace pattern, glob or list of shard paths/URLs), or use data=demo"
            )
        self.train_urls = expand_urls(self.shards)
        check_local_shards(self.train_urls, "data.shards")
        if self.val_shards is None:
            self.val_urls = self.train_urls
        else:
            self.val_urls = expand_urls(self.val_shards)
            check_local_shards(self.val_urls, "data.val_shards")

    def train_dataloader(self) -> EpochOfBatches:
        # Built once: the endless stream continues across epochs instead of restarting.
        if self._train_loader is None:
            stream = TrainStream(
                self.train_urls,
                self.spec,
                self.batch_size,
                self.seed,
                self.shuffle_buffer,
                self._place(),
                self._position,
                self.sampling,
                self.source_timeout_s,
                self.skip_ledger,
            )
            loader = DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=self.pin_memory and torch.cuda.is_available(),
                prefetch_factor=4 if self.num_workers > 0 else None,
                generator=self._own_generator(),
                worker_init_fn=make_worker_deaf,
            )
            self._train_loader = EpochOfBatches(loader, self.batches_per_epoch)
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        # Decoded once and kept: the worker path, whatever decode_on_device says.
        spec = replace(self.spec, decode_on_device=False)
        preview = PreviewSet(
            self.val_urls, spec, self.masks, self.val_samples, self.seed, self.source_timeout_s
        )
        return DataLoader(
            preview, batch_size=self.val_batch_size, shuffle=False, generator=self._own_generator()
        )

    def _own_generator(self) -> torch.Generator:
        # Creating a loader iterator draws a worker seed from the global torch RNG unless the
        # loader has its own generator; a resumed run creates its iterators at different times,
        # which would shift every later noise/augmentation draw. Our streams seed themselves.
        return torch.Generator().manual_seed(self.seed)

    def _has_trainer(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def _place(self) -> StreamPlace:
        if not self._has_trainer():
            return StreamPlace()
        return StreamPlace(self.trainer.global_rank, self.trainer.world_size)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Kept on the host: Lightning would walk (and copy) it as a collection.
        self._in_transfer = batch.pop("stream_state", None)
        self._note_consumed(self._in_transfer)
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "stream_state" in batch:  # called without the hook above (tools, tests)
            self._note_consumed(batch["stream_state"])
        elif self._in_transfer is not None:
            batch["stream_state"] = self._in_transfer  # for DataHealth's counts
        self._in_transfer = None
        training = self._has_trainer() and self.trainer.training
        if training and "stream_state" in batch:
            batch[SEEDS_KEY] = self._seeds(batch["stream_state"])
        if is_encoded(batch):
            batch = decode_batch(batch, self.spec.resolution, self.spec.reference_size)
        return device_transform(batch, self.masks, self.augment, training)

    def _seeds(self, stream_state: StreamState) -> BatchSeeds:
        """The seeds of every draw for this batch, on this rank (``pbe_lightning/batch_seeds``).

        The batch's index on this rank resumes with the stream, so a resumed run draws the same.
        """
        return BatchSeeds(self.seed, self._place().rank, stream_state.index)

    def _note_consumed(self, stream_state: StreamState | None) -> None:
        """In training, a batch handed to the step is consumed: the stream resumes after it."""
        if stream_state is not None and self._has_trainer() and self.trainer.training:
            self._next_batch = stream_state.index + 1
            self._streams[stream_state.index % len(self._streams)] = stream_state.state

    def _shards_fingerprint(self) -> str:
        urls = getattr(self, "train_urls", None) or expand_urls(self.shards)
        return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]

    # Lightning saves these in every checkpoint: the data stream resumes where it stopped.
    def state_dict(self) -> dict:
        streams = [list(self._streams)]
        world_size = self._place().world_size
        if world_size > 1 and torch.distributed.is_initialized():
            streams = [None] * world_size
            torch.distributed.all_gather_object(streams, list(self._streams))
        return {
            "format": 2,
            "next_batch": self._next_batch,
            "streams": streams,  # [rank][worker stream] -> RecordSource state, or None
            "world_size": len(streams),
            "num_workers": self.num_workers,
            "sampling": self.sampling,
            "shards": self._shards_fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        rank, world_size = self._place().rank, self._place().world_size
        change = self._resume_blocker(state, world_size)
        if change:
            warnings.warn(
                f"{change}: the data stream continues with fresh samples but cannot replay the "
                "exact ones",
                stacklevel=2,
            )
            # A new seed, or the restarted streams would replay the run's first samples.
            self.seed = self.seed * 1_000_003 + state["next_batch"]
            self._position = StreamPosition(state["next_batch"], ())
        else:
            self._position = StreamPosition(state["next_batch"], tuple(state["streams"][rank]))
        self._next_batch = self._position.next_batch
        self._streams = list(self._position.streams) or [None] * max(1, self.num_workers)

    def _resume_blocker(self, state: dict, world_size: int) -> str | None:
        """Why the saved stream state cannot be continued exactly, or None."""
        if state.get("format") != 2:
            return "the checkpoint's data position was saved by an older pbe-lightning"
        if state["world_size"] != world_size or state["num_workers"] != self.num_workers:
            return (
                f"resuming with {world_size} ranks x {self.num_workers} workers, saved with "
                f"{state['world_size']} x {state['num_workers']} (keep trainer.devices, "
                "trainer.num_nodes and data.num_workers for an exact resume)"
            )
        if state["sampling"] != self.sampling:
            return f"data.sampling is {self.sampling}, the checkpoint used {state['sampling']}"
        if state["shards"] != self._shards_fingerprint():
            return "data.shards lists other shards than the checkpoint's run read"
        return None


def device_transform(batch: dict, masks: MaskGenerator, augment: Augment, training: bool) -> dict:
    """uint8 crops and boxes -> the model's batch contract, batched on the batch's device.

    Masks and augmentation draw from the batch's own generators (``batch["seeds"]``, set for
    training batches), else from torch's global ones.
    """
    image = batch["image"].float().div_(127.5).sub_(1)  # in place: a 512 px batch is 50 MB
    size, device = image.shape[-1], image.device
    mask = batch.get("mask")
    if mask is None:
        generator = batch_generator(batch, "mask", device)
        mask = masks(
            batch["object_box"],
            batch["mask_box"],
            size,
            generator=generator,
            crop_px=batch.get("crop_px"),
            outline_keep=batch.get("outline_keep"),
        )
    reference = batch["reference"].float().div_(255)
    if training:
        image, mask = augment.scene(image, mask, generator=batch_generator(batch, "scene", device))
        reference = augment.reference(
            reference, generator=batch_generator(batch, "reference", device)
        )
    out = dict(batch)
    out.update(image=image, mask=mask, masked_image=image * mask, reference=reference)
    return out
