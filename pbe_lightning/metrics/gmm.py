"""A Gaussian mixture over CLIP features: parameters, log-likelihood, and its ``.npz`` file.

The parameters are scikit-learn's ``GaussianMixture`` attributes (``weights_``, ``means_``,
``precisions_cholesky_``, ``covariance_type``), so the authors' fitted mixture (imported with
``python -m pbe_lightning.metrics import-gmm``) and ours (``fit-qs``) score with one formula:
scikit-learn's ``score_samples``, written here from its definition.

For component k with precision Cholesky factor P_k (``P_k P_k^T`` = the inverse covariance):
``log N(x | mu_k, S_k) = -D/2 log(2 pi) + log|det P_k| - |(x - mu_k)^T P_k|^2 / 2``, and
``log p(x) = logsumexp_k (log w_k + log N(x | mu_k, S_k))``. Shapes of P by covariance type:
``full`` (K, D, D), ``tied`` (D, D) shared, ``diag`` (K, D) (the diagonal of P_k),
``spherical`` (K,) (P_k = p_k I).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
FEATURES = ("raw", "normalised")  # which CLIP features a mixture was fitted on
FILE_VERSION = 2


@dataclass
class GaussianMixture:
    """Mixture parameters (float64) plus what the scores need to know about them.

    ``features``: ``raw`` (``encode_image`` features, the paper's) or ``normalised`` (unit
    vectors, what our version-1 files were fitted on). ``clip``: the CLIP whose features it
    models ("" when unknown). ``reference``: sorted log-likelihoods of held-out real images
    (``fit-qs`` writes them; ``qs_percentile`` needs them). ``history``: EM's mean
    log-likelihood per step. ``source``: where it came from (``fit-qs``, ``import-gmm ...``).
    """

    weights: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str = "full"
    features: str = "raw"
    clip: str = ""
    reference: np.ndarray = field(default_factory=lambda: np.zeros(0))
    history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    source: str = ""

    def __post_init__(self) -> None:
        self.weights, self.means, self.precisions_cholesky = (
            np.asarray(a, dtype=np.float64)
            for a in (self.weights, self.means, self.precisions_cholesky)
        )
        self.reference = np.asarray(self.reference, dtype=np.float64)
        self.history = np.asarray(self.history, dtype=np.float64)
        check_parameters(self.weights, self.means, self.precisions_cholesky, self.covariance_type)
        if self.features not in FEATURES:
            raise ValueError(f"features={self.features!r}: use one of {FEATURES}")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def log_likelihood(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """``(N, D)`` features -> ``(N,)`` log p(x), as scikit-learn's ``score_samples``."""
        x = float64(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"features of shape {tuple(x.shape)} do not fit a mixture over {self.dim}-d "
                f"features (fitted on {self.clip or 'an unknown CLIP'}): use the same CLIP"
            )
        params = (self.weights, self.means, self.precisions_cholesky)
        joint = weighted_log_prob(x, *(torch.from_numpy(a) for a in params), self.covariance_type)
        return torch.logsumexp(joint, dim=1).numpy()


def check_parameters(
    weights: np.ndarray, means: np.ndarray, precisions_cholesky: np.ndarray, covariance_type: str
) -> None:
    """Shapes and values a mixture must have; a ValueError naming the first that does not."""
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type={covariance_type!r}: one of {COVARIANCE_TYPES}")
    if means.ndim != 2 or weights.shape != (len(means),):
        raise ValueError(f"weights {weights.shape} and means {means.shape}: need (K,) and (K, D)")
    k, d = means.shape
    expected = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}
    if precisions_cholesky.shape != expected[covariance_type]:
        raise ValueError(
            f"precisions_cholesky {precisions_cholesky.shape} for covariance_type="
            f"{covariance_type} with K={k}, D={d}: expected {expected[covariance_type]}"
        )
    arrays = (weights, means, precisions_cholesky)
    if not all(np.isfinite(a).all() for a in arrays) or (weights < 0).any():
        raise ValueError("the mixture has non-finite parameters or negative weights")
    if covariance_type in ("diag", "spherical") and (precisions_cholesky <= 0).any():
        raise ValueError(f"{covariance_type} precisions must be positive")


def float64(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        return features.detach().cpu().double()
    return torch.from_numpy(np.array(features, dtype=np.float64))


def weighted_log_prob(
    x: torch.Tensor,
    weights: torch.Tensor,
    means: torch.Tensor,
    precisions_cholesky: torch.Tensor,
    covariance_type: str,
) -> torch.Tensor:
    """``log w_k + log N(x_n | mu_k, S_k)`` as ``(N, K)``, one component at a time (memory)."""
    dim = x.shape[1]
    columns = []
    for k, mean in enumerate(means):
        factor = precisions_cholesky if covariance_type == "tied" else precisions_cholesky[k]
        diff = x - mean
        if covariance_type in ("full", "tied"):
            y, log_det = diff @ factor, torch.linalg.slogdet(factor).logabsdet
        elif covariance_type == "diag":
            y, log_det = diff * factor, factor.log().sum()
        else:  # spherical: P_k = p_k I
            y, log_det = diff * factor, dim * factor.log()
        columns.append(-0.5 * (dim * math.log(2 * math.pi) + y.square().sum(1)) + log_det)
    return torch.stack(columns, 1) + weights.log()


def precisions_cholesky_of(covariances: torch.Tensor, covariance_type: str) -> torch.Tensor:
    """P with ``P P^T = S^-1`` (upper triangular, as scikit-learn's) from covariances shaped
    ``(K, D, D)`` / ``(D, D)`` (full / tied) or ``(K, D)`` / ``(K,)`` (diag / spherical)."""
    if covariance_type in ("diag", "spherical"):
        return covariances.rsqrt()
    lower = torch.linalg.cholesky(covariances)  # S = L L^T, so S^-1 = L^-T L^-1: P = L^-T
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype).expand_as(lower)
    return torch.linalg.solve_triangular(lower, eye, upper=False).transpose(-1, -2)


# --- the .npz file ---------------------------------------------------------------------------
def save_quality_model(model: GaussianMixture, path: str | Path) -> None:
    """Plain arrays and a JSON string: read back with ``allow_pickle=False``."""
    meta = {
        "version": FILE_VERSION,
        "covariance_type": model.covariance_type,
        "features": model.features,
        "clip": model.clip,
        "source": model.source,
    }
    np.savez(
        path,
        weights=model.weights,
        means=model.means,
        precisions_cholesky=model.precisions_cholesky,
        reference=model.reference,
        history=model.history,
        meta=json.dumps(meta),
    )


def load_quality_model(path: str | Path) -> GaussianMixture:
    """A file written by :func:`save_quality_model`, or a version-1 file of ``fit-qs`` (full or
    diagonal ``covariances``, fitted on L2-normalised features)."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {name: data[name] for name in data.files if name != "meta"}
    common = {"reference": arrays["reference"], "history": arrays["history"]}
    if meta.get("version", 1) == 1:
        covariances = torch.from_numpy(arrays["covariances"])
        kind = "full" if covariances.dim() == 3 else "diag"
        factor = precisions_cholesky_of(covariances, kind).numpy()
        return GaussianMixture(
            arrays["weights"], arrays["means"], factor, kind, "normalised", meta["clip"], **common
        )
    return GaussianMixture(
        arrays["weights"],
        arrays["means"],
        arrays["precisions_cholesky"],
        meta["covariance_type"],
        meta["features"],
        meta["clip"],
        source=meta.get("source", ""),
        **common,
    )
