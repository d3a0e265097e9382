"""import-gmm: the authors' pickled scikit-learn GaussianMixture -> our .npz, read without
running anything from the file. The pickles are crafted here without scikit-learn: a stand-in
class registered under scikit-learn's module name makes pickle write the same opcodes."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pbe_lightning.metrics import load_quality_model, paper_quality_score
from pbe_lightning.metrics.cli import main as metrics_main
from tests.helpers.mixtures import (
    COVARIANCES,
    MEANS,
    POINTS,
    SKLEARN,
    WEIGHTS,
    hand_log_likelihood,
    pickled_as,
)

REPO = Path(__file__).resolve().parents[1]


def fitted_state() -> dict:
    """A fitted 2-component, 2-d 'full' GaussianMixture's attributes, as scikit-learn keeps
    them (precisions_cholesky_ = inverse Cholesky factor, transposed)."""
    covariances = np.array(COVARIANCES["full"])
    factors = np.stack([np.linalg.inv(np.linalg.cholesky(c)).T for c in covariances])
    return {
        "n_components": 2,
        "covariance_type": "full",
        "tol": 1e-3,
        "reg_covar": 1e-6,
        "max_iter": 100,
        "n_init": 1,
        "init_params": "kmeans",
        "weights_init": None,
        "means_init": None,
        "precisions_init": None,
        "random_state": None,
        "warm_start": False,
        "verbose": 0,
        "verbose_interval": 10,
        "converged_": True,
        "n_iter_": 7,
        "lower_bound_": np.float64(-3.25),
        "weights_": np.array(WEIGHTS),
        "means_": np.array(MEANS),
        "covariances_": covariances,
        "precisions_cholesky_": factors,
        "precisions_": np.stack([np.linalg.inv(c) for c in covariances]),
        "n_features_in_": 2,
        "_sklearn_version": "1.0.2",
    }


def import_gmm(pickle_file: Path, out: Path, *extra: str) -> None:
    metrics_main(["import-gmm", str(pickle_file), "--out", str(out), *extra])


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_the_authors_mixture_imports_and_scores_as_score_samples(tmp_path, protocol):
    source = tmp_path / "coco2017_gmm_k20"
    source.write_bytes(pickled_as(SKLEARN, "GaussianMixture", fitted_state(), protocol))
    import_gmm(source, tmp_path / "qs_gmm.npz")
    model = load_quality_model(tmp_path / "qs_gmm.npz")
    assert (model.covariance_type, model.features, model.clip) == (
        "full",
        "raw",
        "ViT-B-32-quickgelu",
    )
    assert model.source == "import-gmm coco2017_gmm_k20"
    expected = [hand_log_likelihood(x, WEIGHTS, MEANS, COVARIANCES["full"]) for x in POINTS]
    log_likelihoods = model.log_likelihood(np.array(POINTS))
    assert log_likelihoods == pytest.approx(expected, rel=1e-12)
    hand_qs = 100 * sum(min(max(v / 300, 0), 1) for v in expected) / len(expected)
    assert paper_quality_score(log_likelihoods) == pytest.approx(hand_qs)


def test_numpy_1_and_older_scikit_learn_module_names_are_read(tmp_path):
    """The authors' file predates numpy 2 (``numpy.core``), maybe scikit-learn 0.22 too."""
    stream = pickled_as("sklearn.mixture.gaussian_mixture", "GaussianMixture", fitted_state(), 2)
    assert b"cnumpy._core.multiarray\n" in stream  # GLOBAL opcodes: module\nname\n
    source = tmp_path / "gmm.pkl"
    source.write_bytes(stream.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    import_gmm(source, tmp_path / "out.npz")
    expected = [hand_log_likelihood(x, WEIGHTS, MEANS, COVARIANCES["full"]) for x in POINTS]
    loaded = load_quality_model(tmp_path / "out.npz")
    assert loaded.log_likelihood(np.array(POINTS)) == pytest.approx(expected, rel=1e-12)


class Payload:
    """A pickle that runs ``call(*args)`` when loaded."""

    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def payloads(marker: Path) -> dict[str, bytes]:
    import builtins

    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": pickle.dumps(Payload(os.system, f"touch {marker}")),
        "builtins.eval": pickle.dumps(Payload(builtins.eval, touch)),
        "builtins.exec": pickle.dumps(Payload(builtins.exec, touch), protocol=2),
        "subprocess.Popen": pickle.dumps(Payload(subprocess.Popen, ["touch", str(marker)])),
        "inside the mixture": pickled_as(
            SKLEARN,
            "GaussianMixture",
            fitted_state() | {"verbose": Payload(os.system, f"touch {marker}")},
            4,
        ),
    }


@pytest.mark.parametrize(
    "kind",
    ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "inside the mixture"],
)
def test_a_payload_is_refused_before_it_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    source = tmp_path / "evil.pkl"
    source.write_bytes(payloads(marker)[kind])
    with pytest.raises(SystemExit) as info:
        import_gmm(source, tmp_path / "out.npz")
    message = str(info.value.code)
    assert "\n" not in message and "refused" in message and "nothing in the file was run" in message
    assert not marker.exists() and not (tmp_path / "out.npz").exists()


def test_the_command_refuses_a_payload_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    source = tmp_path / "evil.pkl"
    source.write_bytes(payloads(marker)["os.system"])
    command = [sys.executable, "-m", "pbe_lightning.metrics", "import-gmm", str(source)]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "out.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and not marker.exists()
    assert result.stderr.strip().splitlines() == [
        f"import-gmm: {source}: refused posix.system: not part of a pickled scikit-learn "
        "GaussianMixture (allowed: numpy arrays, dtypes and scalars, sklearn.mixture "
        "GaussianMixture); nothing in the file was run"
    ]


def test_joblib_files_and_other_contents_are_refused_with_the_reason(tmp_path):
    cases = {
        "joblib.pkl": pickled_as("joblib.numpy_pickle", "NumpyArrayWrapper", {"shape": (2,)}, 4),
        "joblib.gz": gzip.compress(pickle.dumps({"weights_": 1.0})),
        "dict.pkl": pickle.dumps({"weights_": np.ones(2)}),
        "object_array.pkl": pickled_as(
            SKLEARN, "GaussianMixture", {"weights_": np.array([None])}, 4
        ),
        "truncated.pkl": pickled_as(SKLEARN, "GaussianMixture", fitted_state(), 4)[:200],
        "unfitted.pkl": pickled_as(SKLEARN, "GaussianMixture", {"n_components": 20}, 4),
    }
    reasons = {
        "joblib.pkl": "joblib files are not supported .*NumpyArrayWrapper",
        "joblib.gz": "joblib files are not supported .*gzip-compressed",
        "dict.pkl": "holds a dict, not a scikit-learn GaussianMixture",
        "object_array.pkl": "refused a numpy array of Python objects",
        "truncated.pkl": "not a readable pickle",
        "unfitted.pkl": r"lacks \['weights_', 'means_', 'precisions_cholesky_', 'covariance_type'\]",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SystemExit, match=reasons[name]) as info:
            import_gmm(tmp_path / name, tmp_path / "out.npz")
        assert "\n" not in str(info.value.code), name
    with pytest.raises(SystemExit, match="no such file"):
        import_gmm(tmp_path / "missing.pkl", tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def test_math_of_the_hand_helpers_is_not_circular():
    """The hand log-likelihood agrees with a brute-force sum over a fine grid: it integrates
    to 1 (so it is a density, not an expression sharing a mistake with the code)."""
    step = 0.05
    grid = np.arange(-12, 12, step)
    total = sum(
        math.exp(hand_log_likelihood((x, y), WEIGHTS, MEANS, COVARIANCES["full"])) * step * step
        for x in grid
        for y in grid
    )
    assert total == pytest.approx(1, abs=1e-3)
