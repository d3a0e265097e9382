"""Fitting our own QS mixture by EM (``python -m pbe_lightning.metrics fit-qs``).

The paper's QS uses the authors' mixture (k=20, fitted on COCO by scikit-learn; import it with
``import-gmm``). This fits one on any folder of real images when that file is not at hand, or
for another CLIP, without scikit-learn: k-means++ seeding, then EM with ``reg_covar`` added to
the covariances' diagonal, as scikit-learn's ``GaussianMixture`` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pbe_lightning.metrics.gmm import (
    GaussianMixture,
    float64,
    precisions_cholesky_of,
    weighted_log_prob,
)


def _kmeans_init(
    x: torch.Tensor, k: int, generator: torch.Generator, steps: int = 10
) -> torch.Tensor:
    """k-means++ seeding and a few Lloyd steps: EM from random points often merges clusters."""
    centres = x[torch.randint(len(x), (1,), generator=generator)]
    for _ in range(k - 1):
        distance = torch.cdist(x, centres).min(1).values.square()
        pick = torch.multinomial(distance + 1e-12, 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
    for _ in range(steps):
        labels = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            if (labels == j).any():  # an empty cluster keeps its seed point
                centres[j] = x[labels == j].mean(0)
    return F.one_hot(torch.cdist(x, centres).argmin(1), k).double()


def _m_step(
    x: torch.Tensor, resp: torch.Tensor, covariance: str, reg: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, means and precision Cholesky factors from responsibilities."""
    counts = resp.sum(0) + 1e-10
    means = resp.T @ x / counts[:, None]
    covs = []
    for j in range(len(means)):
        weighted = resp[:, j, None] * (x - means[j])
        if covariance == "diag":
            covs.append((weighted * (x - means[j])).sum(0) / counts[j] + reg)
        else:
            covs.append(weighted.T @ (x - means[j]) / counts[j] + reg * torch.eye(x.shape[1]))
    return counts / len(x), means, precisions_cholesky_of(torch.stack(covs), covariance)


def fit_gmm(
    features: torch.Tensor | np.ndarray,
    k: int = 20,
    seed: int = 0,
    covariance: str = "full",
    reg_covar: float = 0.1,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> GaussianMixture:
    """EM for a ``k``-component mixture; ``reference`` is left empty (see fit_quality_model).

    Full covariances: CLIP features are strongly correlated and off-distribution images show
    in those correlations (tiny model: noise scored QS ~7 full, 20-38 diagonal). A component
    owns fewer points than dimensions (k=20, a few thousand 512-d features), so its covariance
    is singular: ``reg_covar`` x the mean per-dimension variance is added to the diagonal
    (scale-free shrinkage; at 1e-3 EM froze on its k-means start there, at 0.1 it did not).
    As with scikit-learn's ``reg_covar``, that M step is inexact: the likelihood can dip a bit.
    """
    if covariance not in ("diag", "full"):
        raise ValueError(f"covariance={covariance!r}: use 'diag' or 'full'")
    x = float64(features)
    if len(x) < k:
        raise ValueError(f"{len(x)} samples cannot fit a {k}-component mixture")
    reg = reg_covar * float(x.var(0).mean())
    params = _m_step(x, _kmeans_init(x, k, torch.Generator().manual_seed(seed)), covariance, reg)
    history: list[float] = []
    for _ in range(max_iter):
        joint = weighted_log_prob(x, *params, covariance)
        total = torch.logsumexp(joint, dim=1, keepdim=True)
        history.append(float(total.mean()))
        if len(history) > 1 and abs(history[-1] - history[-2]) < tol * abs(history[-2]) + 1e-12:
            break
        params = _m_step(x, (joint - total).exp(), covariance, reg)
    weights, means, factors = (p.numpy() for p in params)
    return GaussianMixture(weights, means, factors, covariance, history=np.array(history))


def holdout_size(count: int, holdout: float) -> int:
    """How many of ``count`` real features ``fit_quality_model`` holds out (the rest fit)."""
    return int(round(holdout * count))


def fit_quality_model(
    features: torch.Tensor | np.ndarray,
    k: int = 20,
    seed: int = 0,
    holdout: float = 0.2,
    **gmm_options: object,
) -> GaussianMixture:
    """Fit on a random ``1 - holdout`` of the real features; keep the held-out log-likelihoods
    (``reference``, for ``qs_percentile``).

    Held out because the fit set's own likelihoods are optimistic (EM fitted them): real
    images the mixture has not seen are the fair yardstick for generated ones.
    """
    x = float64(features).numpy()
    order = np.random.default_rng(seed).permutation(len(x))
    held = holdout_size(len(x), holdout)
    # holdout=0 falls back to the fit set itself (optimistic, but usable on tiny sets).
    fit_rows, held_rows = order[held:], order[:held] if held else order
    model = fit_gmm(x[fit_rows], k, seed, **gmm_options)  # type: ignore[arg-type]
    model.reference = np.sort(model.log_likelihood(x[held_rows]))
    model.source = "fit-qs"
    return model
