"""The paper's metrics while training: ``val/fid_clip``, ``val/clip_score``, ``val/qs``.

Every ``every_n_validations``-th validation (0: off), the validation set, i.e. the DataModule's
fixed preview of ``data.val_shards`` (or of the training shards), is painted with a fixed seed
(``seed`` + the index of each batch's first sample), each edit pasted into its hole and rounded
to 8 bits (what a saved PNG holds), then scored by ``metrics.EditScores``, the code evaluate.py
scores a benchmark with, with the same definitions: FID of raw CLIP ``encode_image`` features
against the preview's sources, the region CLIP score (the edit cropped to its hole's box vs the
reference) and, with ``qs_model``, QS by the paper's formula. ``metrics`` selects other
registered scores (``metrics.scores.SCORES``), each logged as ``val/<name>``.

``exemplar_following`` and ``leakage`` (``metrics.exemplar``; the demo turns them on) need each
exemplar's true colour, which the preview does not record: they hold for exemplars that are one
flat-coloured object on a background (the demo world), whose colours are read off the exemplar
images. The preview is painted a second time with its exemplars swapped (sample ``i`` with
sample ``i + 1``'s), so the exemplar's background differs from the scene's and copy-pasting it
shows; the distractor colours are other samples' exemplars (chance level ``1 / 4``).

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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, default_collate

from pbe_lightning.images import composite, mask_bounding_box
from pbe_lightning.metrics import (
    PAPER_METRICS,
    ClipFeatures,
    EditScores,
    GaussianMixture,
    load_quality_model_for,
)
from pbe_lightning.metrics.exemplar import swapped_truths
from pbe_lightning.metrics.scores import (
    EXEMPLAR_METRICS,
    FID_METRICS,
    KnownEdit,
    check_metric_names,
)

OFF = "callbacks.edit_metrics.every_n_validations=0"
SWAP_SAMPLES = 5  # swapped-exemplar scores: the painted exemplar and 3 distractors' donors + 1
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


def pasted_edits(batch: dict, painted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The painting ([-1, 1]) pasted into the hole of the batch's sources, in 8 bits, and the
    holes (white = edit, as a user's mask file), both ``(B, C, H, W)`` in [0, 1]."""
    source = batch["image"].float() * 0.5 + 0.5
    hole = 1 - batch["mask"].float()
    return eight_bit(composite(source, painted.float() * 0.5 + 0.5, hole)), hole


def score_batch(scores: EditScores, batch: dict, painted: torch.Tensor) -> list[float]:
    """One preview batch (the model's contract) and its painted images ([-1, 1]) into
    ``scores``: real = the sources, edit = the painting pasted into the hole; returns the
    region CLIP scores."""
    edits, hole = pasted_edits(batch, painted)
    scores.add_real(list(eight_bit(batch["image"].float() * 0.5 + 0.5).split(1)))
    boxes = [mask_bounding_box(h) for h in hole]
    return scores.add_edits(list(edits.split(1)), boxes, list(batch["reference"].split(1)))


def score_swapped_batch(
    scores: EditScores, batch: dict, painted: torch.Tensor, plans: list
) -> None:
    """A preview batch painted with swapped exemplars (``batch["reference"]`` holds them) into
    ``scores``, each edit with its truth from ``metrics.exemplar.swapped_truths`` (None: left
    out); the true background behind the hole is taken flat, in the scene's colour there."""
    edits, hole = pasted_edits(batch, painted)
    known = []
    for edit, where, plan in zip(edits, hole, plans):
        if plan is None:
            known.append(None)
            continue
        truth, background = plan
        flat = torch.tensor(background).view(3, 1, 1).expand_as(edit).cpu()
        known.append(KnownEdit(truth, flat, where[0].cpu() > 0.5))
    boxes = [mask_bounding_box(h) for h in hole]
    scores.add_edits(list(edits.cpu().split(1)), boxes, list(batch["reference"].split(1)), known)


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
        metrics: Sequence[str] = PAPER_METRICS,
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
        check_metric_names(list(metrics), "callbacks.edit_metrics.metrics")
        self.metrics = tuple(metrics)
        self.qs_model: GaussianMixture | None = None
        self._clip: ClipFeatures | None = None
        self._validations = 0
        self._warned_fid = False
        self._warned: set[str] = set()
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

    def measured(self, samples: int) -> list[str]:
        """The metrics this preview can give: no FID under 2 samples (warned once), no QS
        without a mixture."""
        with_mixture = self.qs_model is not None
        names = [n for n in self.metrics if n not in ("qs", "qs_percentile") or with_mixture]
        if samples < 2 and FID_METRICS & set(names):
            if not self._warned_fid:
                self._warned_fid = True
                warnings.warn(
                    f"callbacks.edit_metrics: FID needs at least 2 validation samples, the "
                    f"preview has {samples}: {sorted(FID_METRICS & set(names))} not logged "
                    "(raise data.val_samples)",
                    stacklevel=3,
                )
            names = [name for name in names if name not in FID_METRICS]
        swapped = [name for name in names if name in EXEMPLAR_METRICS]
        if swapped and samples < SWAP_SAMPLES:
            self.warn_once(
                f"callbacks.edit_metrics: {swapped} need at least {SWAP_SAMPLES} validation "
                f"samples (an exemplar and 3 distractor colours from others), the preview has "
                f"{samples}: not logged (raise data.val_samples)"
            )
            names = [name for name in names if name not in EXEMPLAR_METRICS]
        return names

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Paint the preview on every rank; rank zero scores it and returns the metrics."""
        loader = validation_loader(trainer)
        names = self.measured(len(loader.dataset))  # the same on every rank
        if not names:
            return {}
        batches = list(preview_batches(trainer, loader))
        paper = [name for name in names if name not in EXEMPLAR_METRICS]
        swapped = [name for name in names if name in EXEMPLAR_METRICS]
        values = {}
        if paper:
            values |= self.score_preview(trainer, pl_module, batches, paper)
        if swapped:
            values |= self.score_swapped(trainer, pl_module, batches, swapped)
        return values

    def paint(self, pl_module: L.LightningModule, start: int, batch: dict) -> torch.Tensor:
        generator = torch.Generator(pl_module.device).manual_seed(self.seed + start)
        return pl_module.paint(batch, self.steps, self.guidance_scale, self.sampler, generator)

    def scores(self, trainer: L.Trainer, device: torch.device, names: list[str], **truth):
        """Rank zero's ``EditScores`` for ``names`` (None elsewhere: only it scores)."""
        if not trainer.is_global_zero:
            return None
        return EditScores(self.metric_clip(device), self.qs_model, metrics=names, **truth)

    def score_preview(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batches: list, names: list[str]
    ) -> dict[str, float]:
        scores = self.scores(trainer, pl_module.device, names)
        for start, batch in batches:
            painted = self.paint(pl_module, start, batch)
            if scores is not None:
                score_batch(scores, batch, painted)
        return scores.compute() if scores is not None else {}

    def score_swapped(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batches: list, names: list[str]
    ) -> dict[str, float]:
        """The preview painted again, each sample with the next one's exemplar (module
        docstring), and scored against the truth read off the flat exemplars."""
        references = torch.cat([batch["reference"] for _, batch in batches])
        plans = swapped_truths(references.float().cpu())
        rolled = references.roll(-1, dims=0)
        scores = self.scores(trainer, pl_module.device, names, ground_truth=True)
        for start, batch in batches:
            count = batch["reference"].shape[0]
            swapped = {**batch, "reference": rolled[start : start + count]}
            painted = self.paint(pl_module, start, swapped)
            if scores is not None:
                score_swapped_batch(scores, swapped, painted, plans[start : start + count])
        values = scores.compute() if scores is not None else {}
        for name, why in (scores.skipped if scores is not None else {}).items():
            self.warn_once(f"callbacks.edit_metrics: {name} not logged: {why}")
        return values

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=2)


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
