"""Frechet distance between Gaussians fitted to two feature sets (FID on CLIP features).

``d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)`` with unbiased covariances (``np.cov``'s
default, as the public tools compute them), all in float64: float32 statistics of 512-d
features lose the small eigenvalues that the matrix square root depends on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


def frechet_distance(
    real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray
) -> float:
    """The Frechet distance of two ``(N, D)`` feature sets, in float64."""
    real, fake = (torch.as_tensor(f).double().cpu() for f in (real_features, fake_features))
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = torch.cov(real.T).reshape(len(mu1), -1), torch.cov(fake.T).reshape(len(mu2), -1)
    # tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2: a symmetric PSD matrix, so eigh is stable
    # where eigvals of the non-symmetric product can return spurious complex parts.
    values, vectors = torch.linalg.eigh(s1)
    root1 = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = root1 @ s2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_root)


class PrecomputedFeatures(nn.Module):
    """The 'feature extractor' of a torchmetrics FID fed features already computed: each image's
    CLIP features are computed once and shared by every score that needs them."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # torchmetrics reads it instead of probing

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # float64 in: torchmetrics returns the distance in the features' dtype.
        return features.double()


def streaming_fid(num_features: int) -> FrechetInceptionDistance:
    """torchmetrics' FID over precomputed ``(B, D)`` features: it keeps float64 running sums
    (any number of images in constant memory) and computes the same distance as
    :func:`frechet_distance`. Local to the process (``sync_on_compute=False``), so one rank can
    score alone while the others do something else."""
    return FrechetInceptionDistance(
        feature=PrecomputedFeatures(num_features), sync_on_compute=False, normalize=True
    )
