"""All scores of a set of edits from one pass over the images: :class:`EditScores`, and the
registry that names them (:data:`SCORES`).

The paper's (:data:`PAPER_METRICS`, the default): ``fid_clip`` (Frechet distance of raw CLIP
``encode_image`` features against real images), ``qs`` (the authors' formula on a mixture) and
``clip_score`` (region vs reference). Ours, selectable: ``fid_clip_normalised`` (the same on
L2-normalised features), ``qs_percentile`` (QS as a percentile among held-out real images) and
``fid_inception`` (the usual Inception FID, from local weights). For edits whose ground truth
is known (:data:`EXEMPLAR_METRICS`, ``metrics.exemplar``): ``exemplar_following`` (the hole
shows the exemplar's colour, chance ``1 / (K + 1)``), ``shape_following`` (and its shape,
chance ``1 / shapes``) and ``leakage`` (the exemplar's own background pasted into the hole).

To add a score: a :class:`Score` subclass (what it takes from real images and from edits, and
its value) and a line in :data:`SCORES` building it from :class:`ScoreInputs`; evaluate.py and
the training callback then take its name in their metric lists. A score that cannot be computed
with the given inputs raises :class:`Unavailable` with the fix, and is reported as skipped.

Local to one process: nothing here is synchronised across ranks, so one rank can score alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pbe_lightning.images import PixelBox, centre_square
from pbe_lightning.metrics.clip_score import region_clip_scores
from pbe_lightning.metrics.exemplar import (
    ExemplarTruth,
    colour_following,
    leakage,
    painted_shape,
)
from pbe_lightning.metrics.features import ClipFeatures, unit
from pbe_lightning.metrics.fid import streaming_fid
from pbe_lightning.metrics.gmm import GaussianMixture
from pbe_lightning.metrics.quality import (
    FIT_QS,
    IMPORT_GMM,
    paper_quality_score,
    percentile_quality_score,
)

PAPER_METRICS = ("fid_clip", "qs", "clip_score")
EXEMPLAR_METRICS = ("exemplar_following", "shape_following", "leakage")  # need ground truth
INCEPTION_SIZE = 299


class Unavailable(Exception):
    """A score the inputs cannot give (e.g. QS without a mixture); the message says why."""


class ImageBatch:
    """Images ``(1, 3, H, W)`` in [0, 1], any sizes; their CLIP features computed at most once."""

    def __init__(self, images: Sequence[torch.Tensor], clip: ClipFeatures) -> None:
        self.images, self.clip = list(images), clip
        self._features: torch.Tensor | None = None

    def clip_features(self) -> torch.Tensor:
        """Raw ``encode_image`` features ``(B, D)``, float32, on the CPU."""
        if self._features is None:
            self._features = self.clip(self.images).cpu()
        return self._features


@dataclass(frozen=True)
class KnownEdit:
    """What one edit is checked against: its exemplar's truth, the true pixels behind its hole
    (``(3, H, W)`` at the edit's size: the source when the hole lies on background) and the
    hole (``(H, W)`` bool)."""

    truth: ExemplarTruth
    background: torch.Tensor
    hole: torch.Tensor


class EditBatch(ImageBatch):
    """Edits with their mask boxes (pixels of the edit, end exclusive) and references, and,
    where known, each one's ground truth (``known``: None per edit without one)."""

    def __init__(
        self,
        edits: Sequence[torch.Tensor],
        boxes: Sequence[PixelBox],
        references: Sequence[torch.Tensor],
        clip: ClipFeatures,
        known: Sequence[KnownEdit | None] | None = None,
    ) -> None:
        super().__init__(edits, clip)
        self.boxes, self.references = list(boxes), list(references)
        self.known = list(known) if known is not None else [None] * len(self.images)


class Score:
    """One metric over a set of edits. ``uses_real``: whether it needs the real images;
    ``chance``: the value a painter that ignores the exemplar gets, where one is defined."""

    uses_real = False
    chance: float | None = None

    def add_real(self, batch: ImageBatch) -> None:
        """Real images (only called when ``uses_real``)."""

    def add_edits(self, batch: EditBatch) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError


class ClipFid(Score):
    """Frechet distance of CLIP features, raw (the paper's) or L2-normalised (ours)."""

    uses_real = True

    def __init__(self, clip: ClipFeatures, normalised: bool) -> None:
        self.metric, self.normalised = streaming_fid(clip.num_features), normalised

    def _features(self, batch: ImageBatch) -> torch.Tensor:
        features = batch.clip_features()
        return unit(features) if self.normalised else features

    def add_real(self, batch: ImageBatch) -> None:
        self.metric.update(self._features(batch), real=True)

    def add_edits(self, batch: EditBatch) -> None:
        self.metric.update(self._features(batch), real=False)

    def compute(self) -> float:
        return float(self.metric.compute())


class InceptionFid(Score):
    """torchmetrics' Inception FID on 299 px centre squares (not the paper's FID)."""

    uses_real = True

    def __init__(self, metric: nn.Module) -> None:
        self.metric = metric

    def _update(self, batch: ImageBatch, real: bool) -> None:
        device = next(iter(self.metric.buffers()), torch.empty(0)).device
        squares = torch.cat([centre_square(image, INCEPTION_SIZE) for image in batch.images])
        self.metric.update(squares.to(device), real=real)

    def add_real(self, batch: ImageBatch) -> None:
        self._update(batch, real=True)

    def add_edits(self, batch: EditBatch) -> None:
        self._update(batch, real=False)

    def compute(self) -> float:
        return float(self.metric.compute())


class QualityScore(Score):
    """QS of the edits' CLIP features under a mixture: the paper's formula or our percentile.
    The features are those the mixture was fitted on (raw, or normalised for old files)."""

    def __init__(self, model: GaussianMixture, percentile: bool) -> None:
        self.model, self.percentile = model, percentile
        self.features: list[torch.Tensor] = []

    def add_edits(self, batch: EditBatch) -> None:
        features = batch.clip_features()
        self.features.append(unit(features) if self.model.features == "normalised" else features)

    def compute(self) -> float:
        log_likelihoods = self.model.log_likelihood(torch.cat(self.features))
        if self.percentile:
            return percentile_quality_score(log_likelihoods, self.model.reference)
        return paper_quality_score(log_likelihoods)


class RegionClipScore(Score):
    """The mean region CLIP score; ``per_item`` keeps each edit's, in the order given."""

    def __init__(self, clip: ClipFeatures) -> None:
        self.clip, self.per_item = clip, []

    def add_edits(self, batch: EditBatch) -> None:
        self.per_item += region_clip_scores(batch.images, batch.boxes, batch.references, self.clip)

    def compute(self) -> float:
        return sum(self.per_item) / len(self.per_item)


class ExemplarScore(Score):
    """A mean over the edits that come with ground truth (``EditBatch.known``); edits without
    one are left out. ``measure(edit, known)``: one edit's value, None to leave it out."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def measure(self, edit: torch.Tensor, known: KnownEdit) -> float | None:
        raise NotImplementedError

    def add_edits(self, batch: EditBatch) -> None:
        for edit, known in zip(batch.images, batch.known):
            if known is not None and (value := self.measure(edit[0], known)) is not None:
                self.values.append(value)

    def compute(self) -> float:
        if not self.values:
            raise Unavailable("no edit had a usable ground truth")
        return sum(self.values) / len(self.values)


class ExemplarFollowing(ExemplarScore):
    """The fraction of edits whose hole shows the exemplar's colour (``metrics.exemplar``);
    ``chance``: the mean of ``1 / (K + 1)`` over the scored edits."""

    def __init__(self) -> None:
        super().__init__()
        self.chances: list[float] = []

    def measure(self, edit: torch.Tensor, known: KnownEdit) -> float:
        followed, _, _ = colour_following(edit, known.background, known.hole, known.truth)
        self.chances.append(1 / (len(known.truth.distractor_colours) + 1))
        self.chance = sum(self.chances) / len(self.chances)
        return float(followed)


class ShapeFollowing(ExemplarScore):
    """The fraction of edits whose painted region has the exemplar's shape, among the shapes
    of ``silhouettes``; edits whose truth names no shape are left out."""

    def __init__(self, silhouettes: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.silhouettes = silhouettes
        self.chance = 1 / len(silhouettes)

    def measure(self, edit: torch.Tensor, known: KnownEdit) -> float | None:
        if known.truth.shape is None:
            return None
        painted = painted_shape(edit, known.background, known.hole, self.silhouettes)
        return float(painted == known.truth.shape)


class Leakage(ExemplarScore):
    """The mean fraction of the hole showing the exemplar's own background (copy-paste)."""

    def measure(self, edit: torch.Tensor, known: KnownEdit) -> float:
        return leakage(edit, known.background, known.hole, known.truth)


@dataclass
class ScoreInputs:
    """What scores are built from besides the images. ``ground_truth``: the edits will come
    with their ground truth (``EditBatch.known``); ``silhouettes``: the shapes it names."""

    clip: ClipFeatures
    qs_model: GaussianMixture | None = None
    inception: nn.Module | None = None
    ground_truth: bool = False
    silhouettes: Mapping[str, torch.Tensor] | None = None


def _mixture(inputs: ScoreInputs, percentile: bool) -> QualityScore:
    if inputs.qs_model is None:
        raise Unavailable(
            f"no qs_model: import the authors' mixture with `{IMPORT_GMM}`, or fit one with "
            f"`{FIT_QS}`"
        )
    if percentile and not len(inputs.qs_model.reference):
        raise Unavailable(
            "qs_percentile needs a mixture from fit-qs (it keeps held-out real log-likelihoods); "
            f"this one has none ({inputs.qs_model.source or 'imported'})"
        )
    return QualityScore(inputs.qs_model, percentile)


def _inception(inputs: ScoreInputs) -> InceptionFid:
    if inputs.inception is None:
        raise Unavailable("no inception_weights")
    return InceptionFid(inputs.inception)


NO_TRUTH = (
    "the edits have no ground truth: only a benchmark whose manifest records each exemplar's "
    "truth (`python -m pbe_lightning.demo.benchmark` writes one) or training's preview of "
    "flat-coloured exemplars gives one"
)


def _known(inputs: ScoreInputs, score: Callable[[], Score]) -> Score:
    if not inputs.ground_truth:
        raise Unavailable(NO_TRUTH)
    return score()


def _shapes(inputs: ScoreInputs) -> Score:
    if inputs.ground_truth and not inputs.silhouettes:
        raise Unavailable("no shape silhouettes: a benchmark manifest's 'shapes' gives them")
    return _known(inputs, lambda: ShapeFollowing(inputs.silhouettes))


SCORES: dict[str, Callable[[ScoreInputs], Score]] = {
    "fid_clip": lambda inputs: ClipFid(inputs.clip, normalised=False),
    "qs": lambda inputs: _mixture(inputs, percentile=False),
    "clip_score": lambda inputs: RegionClipScore(inputs.clip),
    "fid_clip_normalised": lambda inputs: ClipFid(inputs.clip, normalised=True),
    "qs_percentile": lambda inputs: _mixture(inputs, percentile=True),
    "fid_inception": _inception,
    "exemplar_following": lambda inputs: _known(inputs, ExemplarFollowing),
    "shape_following": _shapes,
    "leakage": lambda inputs: _known(inputs, Leakage),
}
FID_METRICS = frozenset({"fid_clip", "fid_clip_normalised", "fid_inception"})  # need 2+ images


def check_metric_names(names: Sequence[str], option: str = "metrics") -> None:
    unknown = [name for name in names if name not in SCORES]
    if unknown or not names:
        raise ValueError(
            f"{option}={list(names)}: unknown {unknown or 'none given'}; choose from "
            f"{sorted(SCORES)} (the paper's: {list(PAPER_METRICS)})"
        )


class EditScores:
    """The scores ``metrics`` names over a set of edits fed in batches of any-size
    ``(1, 3, H, W)`` images in [0, 1]; ``compute()`` -> ``{name: value}``. Scores the inputs
    cannot give are left out, their reasons in ``skipped``."""

    def __init__(
        self,
        clip: ClipFeatures,
        qs_model: GaussianMixture | None = None,
        inception: nn.Module | None = None,
        metrics: Sequence[str] = PAPER_METRICS,
        ground_truth: bool = False,
        silhouettes: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        check_metric_names(metrics)
        self.clip = clip
        inputs = ScoreInputs(clip, qs_model, inception, ground_truth, silhouettes)
        self.scores: dict[str, Score] = {}
        self.skipped: dict[str, str] = {}
        for name in metrics:
            try:
                self.scores[name] = SCORES[name](inputs)
            except Unavailable as why:
                self.skipped[name] = str(why)
        self.real_count = self.edit_count = 0

    @torch.no_grad()
    def add_real(self, images: Sequence[torch.Tensor]) -> None:
        users = [score for score in self.scores.values() if score.uses_real]
        if users:  # only FID looks at real images
            batch = ImageBatch(images, self.clip)
            for score in users:
                score.add_real(batch)
        self.real_count += len(images)

    @torch.no_grad()
    def add_edits(
        self,
        edits: Sequence[torch.Tensor],
        mask_boxes: Sequence[PixelBox],
        references: Sequence[torch.Tensor],
        known: Sequence[KnownEdit | None] | None = None,
    ) -> list[float]:
        """Edits with their mask boxes and references (and ground truth, where known); returns
        each edit's region CLIP score (empty without ``clip_score``)."""
        batch = EditBatch(edits, mask_boxes, references, self.clip, known)
        for score in self.scores.values():
            score.add_edits(batch)
        self.edit_count += len(batch.images)
        region = self.scores.get("clip_score")
        return region.per_item[-len(batch.images) :] if region and batch.images else []

    @property
    def clip_scores(self) -> list[float]:
        """Each edit's region CLIP score so far (empty without ``clip_score``)."""
        region = self.scores.get("clip_score")
        return list(region.per_item) if region else []

    def compute(self) -> dict[str, float]:
        """``{name: value}``; a score the edits could not give (no edit with ground truth)
        is left out and its reason added to ``skipped``."""
        if not self.edit_count:
            raise ValueError("no edits to score")
        values = {}
        for name, score in self.scores.items():
            try:
                values[name] = score.compute()
            except Unavailable as why:
                self.skipped[name] = str(why)
        return values

    def chances(self) -> dict[str, float]:
        """The chance level of each computed score that defines one (call after compute)."""
        return {n: s.chance for n, s in self.scores.items() if s.chance is not None}
