"""COCOEE metrics on CLIP image features, as the paper's public tools compute them, and ours.

The paper's (the defaults): ``fid_clip``, ``qs``, ``clip_score``; ours: ``fid_clip_normalised``,
``qs_percentile``, ``fid_inception`` (:mod:`.scores` registers them all). By concept:

- :mod:`.features`: CLIP ``encode_image`` features (raw) of CLIP-preprocessed images
- :mod:`.fid`: the Frechet distance (float64), streaming over batches with torchmetrics
- :mod:`.gmm`, :mod:`.gmm_fit`, :mod:`.gmm_import`: the QS mixture, its log-likelihood,
  fitting ours, importing the authors' pickled one without running it
- :mod:`.quality`: the QS formulas
- :mod:`.clip_score`: the region CLIP score
- :mod:`.scores`: :class:`EditScores`, the one scoring path of evaluate.py and of training's
  ``EditMetrics`` callback
- :mod:`.cli`: ``python -m pbe_lightning.metrics import-gmm | fit-qs | qs | fid``
"""

from pbe_lightning.metrics.clip_score import region_clip_scores
from pbe_lightning.metrics.features import ClipFeatures, folder_features, unit
from pbe_lightning.metrics.fid import frechet_distance
from pbe_lightning.metrics.gmm import GaussianMixture, load_quality_model, save_quality_model
from pbe_lightning.metrics.gmm_fit import fit_gmm, fit_quality_model
from pbe_lightning.metrics.quality import (
    FIT_QS,
    IMPORT_GMM,
    load_quality_model_for,
    paper_quality_score,
    percentile_quality_score,
)
from pbe_lightning.metrics.scores import PAPER_METRICS, SCORES, EditScores

__all__ = [
    "FIT_QS",
    "IMPORT_GMM",
    "PAPER_METRICS",
    "SCORES",
    "ClipFeatures",
    "EditScores",
    "GaussianMixture",
    "fit_gmm",
    "fit_quality_model",
    "folder_features",
    "frechet_distance",
    "load_quality_model",
    "load_quality_model_for",
    "paper_quality_score",
    "percentile_quality_score",
    "region_clip_scores",
    "save_quality_model",
    "unit",
]
