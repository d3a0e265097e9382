"""QS, the quality score: how likely real-image statistics find each edit's CLIP features.

- ``qs`` (the paper's): each image's log-likelihood under the mixture, divided by 300 and
  clipped to [0, 1]; QS = 100 x the mean over images. With the authors' mixture (k=20, fitted
  on COCO, ``import-gmm``) on raw ViT-B/32 features, this is the number in the paper's table.
- ``qs_percentile`` (ours): the mean percentile (mid-rank) of each image's log-likelihood
  among held-out real images' (``fit-qs`` keeps them), x100: real-like sets score ~50 whatever
  the feature dimension or CLIP, where the paper's fixed 300 only suits its own mixture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pbe_lightning.metrics.gmm import GaussianMixture, load_quality_model

QS_LOG_LIKELIHOOD_SCALE = 300.0  # the public scorer's (x - 0) / (300 - 0), then clipped
FIT_QS = (
    "python -m pbe_lightning.metrics fit-qs --real DIR --clip ARCH [--checkpoint F] --out qs.npz"
)
IMPORT_GMM = "python -m pbe_lightning.metrics import-gmm coco2017_gmm_k20 --out qs_gmm.npz"


def paper_quality_score(log_likelihoods: np.ndarray) -> float:
    """100 x mean(clip(log p(x) / 300, 0, 1))."""
    scaled = np.clip(np.asarray(log_likelihoods, dtype=np.float64) / QS_LOG_LIKELIHOOD_SCALE, 0, 1)
    return float(scaled.mean() * 100)


def percentile_quality_score(log_likelihoods: np.ndarray, reference: np.ndarray) -> float:
    """Mean percentile (mid-rank, 0-100) of each log-likelihood among the sorted ``reference``."""
    if not len(reference):
        raise ValueError(
            "qs_percentile needs the held-out real log-likelihoods that `fit-qs` stores; this "
            "mixture has none (imported?): fit one with " + FIT_QS
        )
    scores = np.asarray(log_likelihoods, dtype=np.float64)
    below = np.searchsorted(reference, scores, side="left")
    not_above = np.searchsorted(reference, scores, side="right")
    return float(np.mean((below + not_above) / 2 / len(reference)) * 100)


def load_quality_model_for(
    path: str | Path, clip_arch: str, option: str = "qs_model"
) -> GaussianMixture:
    """The mixture in ``path``, refused unless it models ``clip_arch``'s features (other
    features would make the score meaningless); ``option`` names the setting in errors."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{option}={path}: no such file; import the authors' mixture with `{IMPORT_GMM}` "
            f"or fit one with `{FIT_QS}`"
        )
    model = load_quality_model(path)
    if model.clip and model.clip != clip_arch:
        raise ValueError(
            f"{option} {path} models the features of CLIP {model.clip}, not {clip_arch}: "
            "use the same CLIP, or a mixture fitted on this one"
        )
    return model
