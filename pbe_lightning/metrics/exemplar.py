"""Did the edit paint the exemplar? Scores for edits whose exemplars have known colours.

The paper's metrics (CLIP-FID, QS, region CLIP score) say whether an edit looks right; they
cannot say whether it shows *the exemplar's* object rather than some plausible object. When an
item records its exemplar's object colour (and shape) and the true pixels behind its hole, three
questions have exact answers:

- **colour following** (``exemplar_following``): the pixels the edit changed inside the hole
  vote for the nearest of the item's candidate colours (the exemplar's plus ``K`` distractors
  drawn from the same distribution); the item is followed when the exemplar's colour wins. For
  any painter whose output does not depend on the exemplar, the candidates are exchangeable,
  so the chance level is exactly ``1 / (K + 1)``; painting nothing counts as not followed.
- **shape following**: the largest changed region's silhouette, fitted to its bounding box,
  is compared (IoU) with every shape's silhouette; chance is ``1 / number of shapes`` when the
  exemplar's shape is drawn uniformly.
- **copy-paste leakage**: the fraction of hole pixels that changed to the exemplar's *own
  background* colour, the artefact of a model that pastes the exemplar crop instead of
  painting its object into the scene (what the paper's bottleneck and augmentation remove).

Where the truth comes from: a benchmark manifest's ``truth`` per item (:meth:`ExemplarTruth.
from_manifest`; ``python -m pbe_lightning.demo.benchmark`` writes such a toy benchmark), or,
for exemplars that are one flat-coloured object on a background, the exemplar image itself
(:func:`flat_exemplar`, what training's preview uses). On photos neither exists: leave these
scores off.

All functions take images as ``(3, H, W)`` float tensors in [0, 1] and holes as ``(H, W)``
bool tensors (True = edited), at the source's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.contrib import connected_components

Colour = Sequence[float]  # RGB in [0, 1]
# A pixel "changed" when it is this far (RGB distance, [0, 1] channels) from the source there.
# Far above resampling and VAE error on flat regions (~0.05), well below the contrast the toy
# benchmark keeps between objects, backgrounds and candidate colours (>= 0.3).
CHANGE_THRESHOLD = 0.15
# At least this fraction of the hole must change for the edit to count as painting something.
MIN_PAINTED_FRACTION = 0.03
# A changed pixel within this distance of the exemplar's background colour (and nearer to it
# than to the exemplar's object colour) shows the exemplar's background: leakage.
LEAK_RADIUS = 0.15


@dataclass(frozen=True)
class ExemplarTruth:
    """What an item's exemplar shows: its object's colour and shape, and its background."""

    colour: Colour
    distractor_colours: Sequence[Colour]
    exemplar_background: Colour
    shape: str | None = None

    @classmethod
    def from_manifest(cls, truth: Mapping) -> ExemplarTruth:
        return cls(
            colour=tuple(truth["colour"]),
            distractor_colours=tuple(tuple(c) for c in truth["distractor_colours"]),
            exemplar_background=tuple(truth["exemplar_background"]),
            shape=truth.get("shape"),
        )

    def candidates(self) -> torch.Tensor:
        """``(K + 1, 3)``: the exemplar's colour first, then the distractors."""
        return torch.tensor([self.colour, *self.distractor_colours], dtype=torch.float32)


@dataclass(frozen=True)
class ItemScores:
    colour_followed: bool
    painted_fraction: float  # of the hole
    votes: list[int]  # per candidate, the exemplar's first
    shape_followed: bool | None  # None without a shape truth or silhouettes
    painted_shape: str | None
    leakage: float  # fraction of the hole showing the exemplar's background


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` -> ``(H * W, 3)``."""
    return image.reshape(3, -1).T.float()


def changed_pixels(edit: torch.Tensor, source: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` bool: hole pixels the edit moved away from the source (the true background)."""
    distance = (edit.float() - source.float()).norm(dim=0)
    return hole & (distance > CHANGE_THRESHOLD)


def colour_votes(edit: torch.Tensor, changed: torch.Tensor, truth: ExemplarTruth) -> torch.Tensor:
    """Votes per candidate colour ``(K + 1,)``: each changed pixel for its nearest colour.

    The exemplar's background is one more (symmetric) option that takes no candidate's vote,
    so leaked background cannot push a candidate either way.
    """
    options = torch.cat([truth.candidates(), torch.tensor([truth.exemplar_background])])
    pixels = _pixels(edit)[changed.reshape(-1)]
    nearest = torch.cdist(pixels, options).argmin(dim=1)
    return torch.bincount(nearest, minlength=len(options))[:-1]


def colour_following(
    edit: torch.Tensor, source: torch.Tensor, hole: torch.Tensor, truth: ExemplarTruth
) -> tuple[bool, float, list[int]]:
    """(followed, painted fraction of the hole, votes): see the module docstring."""
    changed = changed_pixels(edit, source, hole)
    painted = float(changed.sum()) / max(1, int(hole.sum()))
    votes = colour_votes(edit, changed, truth)
    followed = painted >= MIN_PAINTED_FRACTION and int(votes.argmax()) == 0 and int(votes[0]) > 0
    return followed, painted, votes.tolist()


def largest_region(mask: torch.Tensor) -> torch.Tensor:
    """The largest connected True region of ``(H, W)`` ``mask`` (kornia's labelling)."""
    if not mask.any():
        return mask
    iterations = sum(mask.shape)  # enough to cross the image along a convex shape
    labels = connected_components(mask[None, None].float(), num_iterations=iterations)[0, 0]
    values, counts = labels[mask].unique(return_counts=True)
    return labels == values[counts.argmax()]


def fitted_iou(region: torch.Tensor, silhouette: torch.Tensor) -> float:
    """IoU of ``region`` with ``silhouette`` (``(h, w)`` in [0, 1]) resized to its bounding box."""
    ys, xs = region.nonzero(as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    fitted = F.interpolate(silhouette[None, None].float(), (y1 - y0, x1 - x0), mode="area")
    template = fitted[0, 0] > 0.5
    inside = region[y0:y1, x0:x1]
    union = (inside | template).sum()
    return float((inside & template).sum()) / max(1, int(union))


def painted_shape(
    edit: torch.Tensor,
    source: torch.Tensor,
    hole: torch.Tensor,
    silhouettes: Mapping[str, torch.Tensor],
) -> str | None:
    """The silhouette that best fits the largest changed region, or None if nothing changed."""
    region = largest_region(changed_pixels(edit, source, hole))
    if float(region.sum()) < MIN_PAINTED_FRACTION * max(1, int(hole.sum())):
        return None
    scores = {name: fitted_iou(region, shape) for name, shape in silhouettes.items()}
    return max(scores, key=scores.get)


def leakage(
    edit: torch.Tensor, source: torch.Tensor, hole: torch.Tensor, truth: ExemplarTruth
) -> float:
    """Fraction of the hole's pixels that changed to the exemplar's own background colour."""
    changed = changed_pixels(edit, source, hole).reshape(-1)
    pixels = _pixels(edit)
    to_background = (pixels - torch.tensor(truth.exemplar_background)).norm(dim=1)
    to_object = (pixels - torch.tensor(truth.colour)).norm(dim=1)
    leaked = changed & (to_background < LEAK_RADIUS) & (to_background < to_object)
    return float(leaked.sum()) / max(1, int(hole.sum()))


def score_item(
    edit: torch.Tensor,
    source: torch.Tensor,
    hole: torch.Tensor,
    truth: ExemplarTruth,
    silhouettes: Mapping[str, torch.Tensor] | None = None,
) -> ItemScores:
    """All scores of one edit; ``edit``, ``source`` ``(3, H, W)`` in [0, 1], ``hole`` ``(H, W)``."""
    if edit.shape != source.shape or hole.shape != source.shape[-2:]:
        raise ValueError(
            f"edit {tuple(edit.shape)}, source {tuple(source.shape)} and hole "
            f"{tuple(hole.shape)} must share their size: resize the edit to the source's"
        )
    hole = hole.bool()
    followed, painted, votes = colour_following(edit, source, hole, truth)
    shape = shape_followed = None
    if silhouettes and truth.shape is not None:
        shape = painted_shape(edit, source, hole, silhouettes)
        shape_followed = shape == truth.shape
    return ItemScores(
        followed, painted, votes, shape_followed, shape, leakage(edit, source, hole, truth)
    )


def hole_mean(edit: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    return _pixels(edit)[hole.reshape(-1).bool()].mean(0)


def swap_moves_toward(
    edit_a: torch.Tensor,
    edit_b: torch.Tensor,
    hole: torch.Tensor,
    colour_a: Colour,
    colour_b: Colour,
) -> bool:
    """The same scene and hole painted with exemplar A and with exemplar B: is the hole's mean
    colour nearer to A's colour in A's edit than in B's, and nearer to B's in B's edit?

    A painter that ignores the exemplar (same noise, same output) never passes.
    """
    mean_a, mean_b = hole_mean(edit_a, hole), hole_mean(edit_b, hole)
    a, b = torch.tensor(colour_a), torch.tensor(colour_b)
    return bool(
        (mean_a - a).norm() < (mean_b - a).norm() and (mean_b - b).norm() < (mean_a - b).norm()
    )


def summarise(scores: Sequence[ItemScores], distractors: int, shapes: int | None = None) -> dict:
    """Rates over items, with their chance levels."""
    count = max(1, len(scores))
    summary = {
        "items": len(scores),
        "colour_following": sum(s.colour_followed for s in scores) / count,
        "colour_chance": 1 / (distractors + 1),
        "painted_fraction": sum(s.painted_fraction for s in scores) / count,
        "leakage": sum(s.leakage for s in scores) / count,
    }
    judged = [s.shape_followed for s in scores if s.shape_followed is not None]
    if judged:
        summary["shape_following"] = sum(judged) / len(judged)
        summary["shape_chance"] = 1 / shapes if shapes else None
    return summary


# --- truth read from a flat-coloured exemplar -------------------------------------------------
BORDER = 1 / 16  # the exemplar's frame (this fraction of its side) shows its background
OBJECT_CONTRAST = 0.25  # exemplar pixels this far from its background colour are its object's
MIN_OBJECT_FRACTION = 0.05  # an exemplar with less object than this gives no truth
SEPARATION = 0.35  # candidate colours at least this far apart (RGB distance, [0, 1] channels)
MIN_CONTRAST = 0.3  # ... and at least this far from the backgrounds the scores must tell apart


@dataclass(frozen=True)
class FlatExemplar:
    """An exemplar showing one flat-coloured object: its colour and its background's."""

    colour: tuple[float, float, float]
    background: tuple[float, float, float]


def flat_exemplar(reference: torch.Tensor) -> FlatExemplar | None:
    """Read the object colour and background colour off a ``(3, H, W)`` exemplar in [0, 1]:
    the background is the median of its frame, the object the median of the pixels far from
    it. None when too little of it differs from its frame. Only meaningful for exemplars that
    are one flat colour on a background (the demo world, or test sets rendered like it)."""
    height, width = reference.shape[-2:]
    edge = max(1, round(BORDER * min(height, width)))
    frame = torch.ones(height, width, dtype=torch.bool)
    frame[edge:-edge, edge:-edge] = False
    pixels = _pixels(reference)
    background = pixels[frame.reshape(-1)].median(dim=0).values
    far = (pixels - background).norm(dim=1) > OBJECT_CONTRAST
    if float(far.float().mean()) < MIN_OBJECT_FRACTION:
        return None
    colour = pixels[far].median(dim=0).values
    return FlatExemplar(_colour(colour), _colour(background))


def _colour(values: torch.Tensor) -> tuple[float, float, float]:
    red, green, blue = (float(v) for v in values)
    return (red, green, blue)


def _far(colour: Colour, others: Sequence[Colour], distance: float) -> bool:
    return all(
        float((torch.tensor(colour) - torch.tensor(other)).norm()) >= distance for other in others
    )


def swapped_truth(
    exemplar: FlatExemplar, scene_background: Colour, pool: Sequence[Colour], distractors: int
) -> ExemplarTruth | None:
    """Truth for painting ``exemplar`` into a scene whose background near the hole is
    ``scene_background``: the exemplar's colour and the first ``distractors`` colours of
    ``pool`` that meet the same conditions (apart from each other, contrasting with both
    backgrounds), so the candidates stay exchangeable. None when the exemplar's colour itself
    cannot be told from the backgrounds, or ``pool`` has too few such colours."""
    backgrounds = (exemplar.background, scene_background)
    chosen: list[Colour] = [exemplar.colour]
    if not _far(exemplar.colour, backgrounds, MIN_CONTRAST):
        return None
    for colour in pool:
        if len(chosen) > distractors:
            break
        if _far(colour, chosen, SEPARATION) and _far(colour, backgrounds, MIN_CONTRAST):
            chosen.append(colour)
    if len(chosen) <= distractors:
        return None
    return ExemplarTruth(chosen[0], tuple(chosen[1:]), exemplar.background)


def swapped_truths(
    references: torch.Tensor, distractors: int = 3
) -> list[tuple[ExemplarTruth, tuple[float, float, float]] | None]:
    """Crop-as-reference samples ``(N, 3, h, w)`` in [0, 1] painted with each other's
    exemplars: sample ``i`` with sample ``i + 1``'s (cyclically). Per sample, the truth of that
    swap and the colour of the scene's background near the hole (read off sample ``i``'s own
    exemplar, which was cropped there), or None where flat exemplars cannot give one.
    Distractors come from the other samples' exemplars, in order after the one painted."""
    exemplars = [flat_exemplar(reference) for reference in references]
    count = len(exemplars)
    plans: list[tuple[ExemplarTruth, tuple[float, float, float]] | None] = []
    for index, own in enumerate(exemplars):
        painted = exemplars[(index + 1) % count]
        others = [exemplars[(index + 1 + k) % count] for k in range(1, count)]
        pool = [other.colour for other in others if other is not None]
        truth = None
        if own is not None and painted is not None and count > 1:
            truth = swapped_truth(painted, own.background, pool, distractors)
        plans.append((truth, own.background) if truth is not None else None)
    return plans
