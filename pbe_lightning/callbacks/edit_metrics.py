"""The paper's metrics while training: ``val/fid_clip``, ``val/clip_score``, ``val/qs``.

Every ``every_n_validations``-th validation (0: off), the validation set, i.e. the DataModule's
fixed preview of ``data.val_shards`` (or of the training shards), is painted with a fixed seed
(``seed`` + the index of each batch's first sample), each edit pasted into its hole and rounded
to 8 bits (what a saved PNG holds), then scored by ``metrics.EditScores``, the code evaluate.py
scores a benchmark with: CLIP-FID against the preview's sources, region CLIP score (the edit
cropped to its hole's box vs the reference) and, with ``qs_model``, QS.

The numbers compare variants and steps of one sweep (same preview, same seed); a preview of a
few dozen samples gives a biased FID, so they are not the benchmark's numbers: evaluate.py
scores a checkpoint on COCOEE.

The metrics' CLIP (``clip.arch`` + local ``clip.checkpoint``, or ``local-dir:``) is loaded once,
at the first measurement, onto the module's device; the callback holds it, so it is neither
part of the module nor of its checkpoints. Under several ranks every rank paints the whole
preview (the same calls everywhere, so a sharded UNet gathers in step) and rank zero alone
scores and logs (``sync_dist=False``): there is no collective of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, default_collate

from pbe_lightning.images import composite, mask_bounding_box
from pbe_lightning.metrics import (
    ClipFeatures,
    EditScores,
    GaussianMixture,
    load_quality_model_for,
)

OFF = "callbacks.edit_metrics.every_n_validations=0"
B32 = "/weights/clip-vit-b-32/open_clip_pytorch_model.bin"


def check_clip(arch: str | None, checkpoint: str | None) -> None:
    """Settings errors of the metrics' CLIP, named by the recipe's keys (``metrics_clip.*``)."""
    if not arch:
        raise ValueError(
            "callbacks.edit_metrics is on but no metrics CLIP is set: set metrics_clip.arch "
            f"(ViT-B-32-quickgelu, or local-dir:/folder) and metrics_clip.checkpoint, or {OFF}"
        )
    if arch.startswith("local-dir:"):
        return  # the folder may be generated with the model (the demo): checked at setup
    if not checkpoint:
        raise ValueError(
            f"metrics_clip.checkpoint is required by callbacks.edit_metrics: pass "
            f"metrics_clip.checkpoint={B32} (local weights for metrics_clip.arch={arch}; "
            f"nothing is downloaded), or turn the metrics off with {OFF}"
        )
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"metrics_clip.checkpoint={checkpoint}: no such file (local weights for "
            f"metrics_clip.arch={arch}); fix the path, or turn the metrics off with {OFF}"
        )


def eight_bit(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images as an 8-bit file stores them: exactly what ``images.read_image`` returns
    for the saved PNG, so these scores equal evaluate.py's on the same edits saved."""
    return images.float().clamp(0, 1).mul(255).round().div(255)


def score_batch(scores: EditScores, batch: dict, painted: torch.Tensor) -> list[float]:
    """One preview batch (the model's contract) and its painted images ([-1, 1]) into
    ``scores``: real = the sources, edit = the painting pasted into the hole; returns the
    region CLIP scores."""
    source = batch["image"].float() * 0.5 + 0.5
    hole = 1 - batch["mask"].float()  # white = edit, as a user's mask file
    edits = eight_bit(composite(source, painted.float() * 0.5 + 0.5, hole))
    scores.add_real(list(eight_bit(source).split(1)))
    boxes = [mask_bounding_box(h) for h in hole]
    return scores.add_edits(list(edits.split(1)), boxes, list(batch["reference"].split(1)))


class EditMetrics(L.Callback):
    """See the module docstring. ``steps`` / ``guidance_scale`` / ``sampler``: the painting's,
    default the module's (``model.sample_steps`` ...), as for the sample grids. Validations are
    counted from the start of each run, a resumed one included (its first one is measured),
    as for the sample grids: nothing of the callback is in checkpoints."""

    def __init__(
        self,
        every_n_validations: int = 0,
        clip: Mapping | None = None,
        qs_model: str | None = None,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
    ) -> None:
        if every_n_validations < 0:
            raise ValueError(
                f"callbacks.edit_metrics.every_n_validations={every_n_validations}: use 0 (off) "
                "or N >= 1 (every N-th validation)"
            )
        self.every = every_n_validations
        clip = dict(clip or {})
        self.clip_arch, self.clip_checkpoint = clip.get("arch"), clip.get("checkpoint")
        self.seed, self.steps = seed, steps
        self.guidance_scale, self.sampler = guidance_scale, sampler
        self.qs_model: GaussianMixture | None = None
        self._clip: ClipFeatures | None = None
        self._validations = 0
        self._warned_fid = False
        if self.every:  # settings fail before training starts, named by their keys
            check_clip(self.clip_arch, self.clip_checkpoint)
            if qs_model:
                option = "callbacks.edit_metrics.qs_model"
                self.qs_model = load_quality_model_for(qs_model, self.clip_arch, option)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.every and self.clip_arch.startswith("local-dir:"):
            folder = Path(self.clip_arch.removeprefix("local-dir:"))
            if not (folder / "open_clip_config.json").is_file():
                raise FileNotFoundError(
                    f"metrics_clip.arch={self.clip_arch}: no open_clip model there (needs "
                    f"open_clip_config.json + weights); fix the path, or {OFF}"
                )

    def metric_clip(self, device: torch.device) -> ClipFeatures:
        if self._clip is None:
            # Plain tensors whatever the loop's mode; building the model initialises weights
            # from the global RNG, which training (and an exact resume) must not see.
            with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
                self._clip = ClipFeatures.load(self.clip_arch, self.clip_checkpoint)
        return self._clip.to(device)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every or trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        values = self.measure(trainer, pl_module)
        for name, value in values.items():  # empty except on rank zero
            pl_module.log(f"val/{name}", value, sync_dist=False, rank_zero_only=True)

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Paint the preview on every rank; rank zero scores it and returns the metrics."""
        loader = validation_loader(trainer)
        dataset = loader.dataset
        scores = None
        if trainer.is_global_zero:
            fid = len(dataset) >= 2
            if not fid and not self._warned_fid:
                self._warned_fid = True
                warnings.warn(
                    f"callbacks.edit_metrics: FID needs at least 2 validation samples, the "
                    f"preview has {len(dataset)}: val/fid_clip is not logged (raise "
                    "data.val_samples)",
                    stacklevel=2,
                )
            scores = EditScores(self.metric_clip(pl_module.device), self.qs_model, fid=fid)
        for start, batch in preview_batches(trainer, loader):
            generator = torch.Generator(pl_module.device).manual_seed(self.seed + start)
            painted = pl_module.paint(
                batch, self.steps, self.guidance_scale, self.sampler, generator
            )
            if scores is not None:
                score_batch(scores, batch, painted)
        return scores.compute() if scores is not None else {}


def validation_loader(trainer: L.Trainer) -> DataLoader:
    """The trainer's (first) validation loader, whose map-style dataset is the fixed preview."""
    loader = trainer.val_dataloaders
    if isinstance(loader, Mapping):
        loader = list(loader.values())
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise TypeError(
            "callbacks.edit_metrics paints the validation set: it needs a map-style dataset "
            f"(with a length) behind the validation loader, got {type(dataset).__name__}"
        )
    return loader


def preview_batches(trainer: L.Trainer, loader: DataLoader) -> Iterator[tuple[int, dict]]:
    """The loader's whole dataset in its batches and order (whatever share of it this rank
    validated), on this rank's device through the same steps as Lightning's evaluation loop
    (precision, transfer hooks, the DataModule's batch transform): ``(index of the first
    sample, batch)``. Not through the loader itself: creating its iterator would draw from the
    global RNG, and ranks split it."""
    dataset = loader.dataset
    size = loader.batch_size or 1
    collate = loader.collate_fn or default_collate
    for start in range(0, len(dataset), size):
        samples = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
        batch = trainer.precision_plugin.convert_input(collate(samples))
        batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
        yield start, trainer.strategy.batch_to_device(batch, dataloader_idx=0)
