"""Gaussian mixtures by hand (2-d, from the density's definition) and pickles of objects
under other modules' names (scikit-learn's GaussianMixture, joblib's records) crafted without
those libraries: the fake module exists only while pickling."""

from __future__ import annotations

import math
import pickle
import sys
import types

SKLEARN = "sklearn.mixture._gaussian_mixture"


def hand_log_likelihood(x: tuple, weights: list, means: list, covariances: list) -> float:
    """log sum_k w_k N(x | mu_k, S_k) in 2-d, from the density's definition."""
    total = 0.0
    for w, (m0, m1), ((a, b), (_, c)) in zip(weights, means, covariances):
        det = a * c - b * b
        d0, d1 = x[0] - m0, x[1] - m1
        quad = (c * d0 * d0 - 2 * b * d0 * d1 + a * d1 * d1) / det
        total += w * math.exp(-0.5 * quad) / (2 * math.pi * math.sqrt(det))
    return math.log(total)


def hand_precision_cholesky(a: float, b: float, c: float) -> list[list[float]]:
    """P = L^-T for S = [[a, b], [b, c]] = L L^T (scikit-learn's precisions_cholesky_)."""
    l11 = math.sqrt(a)
    l21 = b / l11
    l22 = math.sqrt(c - l21 * l21)
    return [[1 / l11, -l21 / (l11 * l22)], [0.0, 1 / l22]]


WEIGHTS = [0.3, 0.7]
MEANS = [(0.0, 1.0), (2.0, -1.0)]
POINTS = [(0.0, 0.0), (1.5, -0.5), (4.0, 3.0), (-2.0, 1.0)]
COVARIANCES = {  # per covariance type: each component's full 2x2 covariance
    "full": [((2.0, 0.5), (0.5, 1.0)), ((1.0, -0.3), (-0.3, 0.5))],
    "tied": [((1.5, 0.4), (0.4, 0.8))] * 2,
    "diag": [((2.0, 0.0), (0.0, 0.5)), ((0.7, 0.0), (0.0, 1.3))],
    "spherical": [((0.8, 0.0), (0.0, 0.8)), ((1.7, 0.0), (0.0, 1.7))],
}


def pickled_as(module: str, name: str, state: dict, protocol: int) -> bytes:
    """``pickle.dumps`` of an object whose class is ``module.name`` with ``state`` as its
    ``__dict__``; the fake module exists only while pickling."""
    cls = type(name, (), {"__module__": module, "__qualname__": name})
    parts = module.split(".")
    fakes = {
        ".".join(parts[: i + 1]): types.ModuleType(".".join(parts[: i + 1]))
        for i in range(len(parts))
    }
    setattr(fakes[module], name, cls)
    saved = {key: sys.modules.get(key) for key in fakes}
    sys.modules.update(fakes)
    try:
        instance = cls()
        instance.__dict__.update(state)
        return pickle.dumps(instance, protocol=protocol)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
