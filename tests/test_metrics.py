"""COCOEE metrics against their definitions: hand computations on fixed feature arrays, and the
tiny open_clip model (32 px input) for what CLIP sees."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pbe_lightning.demo.dataset import demo_scene
from pbe_lightning.demo.tiny_models import tiny_clip_folder
from pbe_lightning.images import mask_bounding_box, to_pil
from pbe_lightning.metrics import (
    ClipFeatures,
    EditScores,
    GaussianMixture,
    fit_gmm,
    fit_quality_model,
    frechet_distance,
    load_quality_model,
    paper_quality_score,
    percentile_quality_score,
    region_clip_scores,
    save_quality_model,
    unit,
)
from pbe_lightning.metrics.cli import main as metrics_main
from pbe_lightning.metrics.fid import streaming_fid
from tests.helpers.mixtures import (
    COVARIANCES,
    MEANS,
    POINTS,
    WEIGHTS,
    hand_log_likelihood,
    hand_precision_cholesky,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clip(cache_dir: Path) -> ClipFeatures:
    return ClipFeatures.load(f"local-dir:{tiny_clip_folder(cache_dir)}")


@pytest.fixture(scope="module")
def open_clip_model(cache_dir: Path):
    import open_clip

    return open_clip.create_model(f"local-dir:{tiny_clip_folder(cache_dir)}").eval()


def scenes(seeds: range, size: int = 48) -> torch.Tensor:
    """Demo scenes (textured backgrounds with shapes): the 'real' images, float in [0, 1]."""
    arrays = [np.asarray(demo_scene(np.random.default_rng([7, s]), size)[0]) for s in seeds]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def normalised(pixels: np.ndarray, clip: ClipFeatures) -> torch.Tensor:
    """HWC uint8 -> CLIP's normalised (1, 3, H, W) input, written out."""
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
    return (tensor - clip.mean) / clip.std


# --- features --------------------------------------------------------------------------------
def test_features_are_raw_encode_image_of_clips_own_preprocessing(clip, open_clip_model):
    images = [(torch.rand(1, 3, 40, 56) * 255).round() / 255 for _ in range(3)]
    features = clip(images)
    # Shorter side to 32 with PIL's bicubic on the 8-bit image (56 -> int(32 * 56 / 40) = 44),
    # then the centre 32 columns (round((44 - 32) / 2) = 6): what clip.load's preprocess does.
    pixels = [np.asarray(to_pil(i).resize((44, 32), Image.Resampling.BICUBIC)) for i in images]
    inputs = torch.cat([normalised(p[:, 6:38], clip) for p in pixels])
    with torch.no_grad():
        expected = open_clip_model.encode_image(inputs, normalize=False)
    assert torch.allclose(features, expected, atol=1e-5)
    assert not torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-2)  # not unit norm
    uint8 = [(image * 255).round().to(torch.uint8) for image in images]
    assert torch.allclose(clip(uint8), features, atol=1e-6)


def test_clip_features_refuse_hub_tags():
    with pytest.raises(FileNotFoundError):
        ClipFeatures.load("ViT-B-32", "openai")


# --- FID -------------------------------------------------------------------------------------
def hand_mean_cov(points: list[tuple[float, float]]) -> tuple[list[float], list[list[float]]]:
    n = len(points)
    mean = [sum(p[i] for p in points) / n for i in range(2)]
    cov = [
        [sum((p[i] - mean[i]) * (p[j] - mean[j]) for p in points) / (n - 1) for j in range(2)]
        for i in range(2)
    ]
    return mean, cov


def hand_frechet_2d(real: list, fake: list) -> float:
    """|m1 - m2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2; for 2x2 matrices whose product has
    positive eigenvalues l1, l2: tr sqrt(M) = sqrt(l1) + sqrt(l2) = sqrt(tr M + 2 sqrt(det M))."""
    (m1, s1), (m2, s2) = hand_mean_cov(real), hand_mean_cov(fake)
    product = [[sum(s1[i][k] * s2[k][j] for k in range(2)) for j in range(2)] for i in range(2)]
    det = (s1[0][0] * s1[1][1] - s1[0][1] ** 2) * (s2[0][0] * s2[1][1] - s2[0][1] ** 2)
    trace_root = math.sqrt(product[0][0] + product[1][1] + 2 * math.sqrt(det))
    means = (m1[0] - m2[0]) ** 2 + (m1[1] - m2[1]) ** 2
    return means + s1[0][0] + s1[1][1] + s2[0][0] + s2[1][1] - 2 * trace_root


REAL_2D = [(0.0, 0.0), (2.0, 0.5), (0.5, 2.0), (2.0, 2.0), (1.0, 1.5)]
FAKE_2D = [(1.0, 0.0), (3.0, 1.0), (2.0, 3.0), (4.0, 2.5)]


def test_frechet_distance_equals_a_hand_computation_in_2d():
    expected = hand_frechet_2d(REAL_2D, FAKE_2D)
    assert frechet_distance(np.array(REAL_2D), np.array(FAKE_2D)) == pytest.approx(expected, 1e-12)
    # The streaming version evaluate.py and training use (torchmetrics, float64 sums), fed in
    # batches of uneven sizes.
    metric = streaming_fid(2)
    for rows, real in ((REAL_2D[:2], True), (REAL_2D[2:], True), (FAKE_2D, False)):
        metric.update(torch.tensor(rows, dtype=torch.float32), real=real)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_its_1d_closed_form_and_torchmetrics():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (500, 1)), rng.normal(2, 3, (400, 1))
    # In 1-D: (m1 - m2)^2 + (s1 - s2)^2 with unbiased standard deviations.
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    x, y = torch.randn(200, 8, dtype=torch.float64), torch.randn(200, 8, dtype=torch.float64)
    y = y @ torch.randn(8, 8, dtype=torch.float64) + 1
    from torchmetrics.image.fid import _compute_fid

    reference = _compute_fid(x.mean(0), torch.cov(x.T), y.mean(0), torch.cov(y.T))
    assert frechet_distance(x, y) == pytest.approx(float(reference), rel=1e-8)


def test_fid_clip_is_on_raw_features_and_the_normalised_variant_is_ours(clip):
    real, edits = list(scenes(range(24)).split(1)), list(scenes(range(100, 116)).split(1))
    scores = EditScores(clip, metrics=["fid_clip", "fid_clip_normalised"])
    scores.add_real(real[:10])
    scores.add_real(real[10:])
    scores.add_edits(edits, [(0, 0, 48, 48)] * len(edits), edits)
    values = scores.compute()
    raw_real, raw_edits = clip(real), clip(edits)
    assert values["fid_clip"] == pytest.approx(frechet_distance(raw_real, raw_edits), rel=1e-6)
    expected = frechet_distance(unit(raw_real), unit(raw_edits))
    assert values["fid_clip_normalised"] == pytest.approx(expected, rel=1e-6)
    assert values["fid_clip"] > 2 * values["fid_clip_normalised"]  # the tiny CLIP's norms ~5


# --- QS --------------------------------------------------------------------------------------
def precisions_for(kind: str) -> list:
    """The precisions_cholesky_ array scikit-learn stores for ``kind``, by hand."""
    covs = COVARIANCES[kind]
    if kind == "full":
        return [hand_precision_cholesky(c[0][0], c[0][1], c[1][1]) for c in covs]
    if kind == "tied":
        return hand_precision_cholesky(covs[0][0][0], covs[0][0][1], covs[0][1][1])
    if kind == "diag":
        return [[1 / math.sqrt(c[0][0]), 1 / math.sqrt(c[1][1])] for c in covs]
    return [1 / math.sqrt(c[0][0]) for c in covs]


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_log_likelihood_is_score_samples_formula(kind):
    model = GaussianMixture(WEIGHTS, MEANS, precisions_for(kind), kind)
    expected = [hand_log_likelihood(x, WEIGHTS, MEANS, COVARIANCES[kind]) for x in POINTS]
    assert model.log_likelihood(np.array(POINTS)) == pytest.approx(expected, rel=1e-12)


def test_paper_qs_is_the_clipped_log_likelihood_over_300():
    # s = clip(ll / 300, 0, 1): 0, 0, 0.5, 1, 1 -> 100 x 0.5
    assert paper_quality_score(np.array([-10.0, 0.0, 150.0, 300.0, 450.0])) == pytest.approx(50)
    assert paper_quality_score(np.array([30.0, 60.0])) == pytest.approx(15)
    # On a mixture, from features: the hand log-likelihoods through the formula.
    model = GaussianMixture(WEIGHTS, MEANS, precisions_for("full"), "full")
    lls = [hand_log_likelihood(x, WEIGHTS, MEANS, COVARIANCES["full"]) for x in POINTS]
    expected = 100 * sum(min(max(v / 300, 0), 1) for v in lls) / len(lls)
    assert paper_quality_score(model.log_likelihood(np.array(POINTS))) == pytest.approx(expected)


def test_percentile_qs_is_the_mean_mid_rank_among_the_reference():
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    # 0 below all: 0; 2.5 above two: 50; 3 (a reference value): mid-rank (2 + 3) / 2 / 4 = 62.5
    assert percentile_quality_score(np.array([0.0]), reference) == 0
    assert percentile_quality_score(np.array([2.5, 3.0]), reference) == pytest.approx(56.25)
    with pytest.raises(ValueError, match="fit-qs"):
        percentile_quality_score(np.array([1.0]), np.zeros(0))


def test_version_1_files_of_fit_qs_still_load_as_normalised_feature_mixtures(tmp_path):
    covs = np.array(COVARIANCES["full"])
    np.savez(
        tmp_path / "old.npz",
        weights=np.array(WEIGHTS),
        means=np.array(MEANS),
        covariances=covs,
        reference=np.array([1.0, 2.0]),
        history=np.zeros(3),
        meta=json.dumps({"clip": "ViT-B-32-quickgelu", "version": 1}),
    )
    model = load_quality_model(tmp_path / "old.npz")
    assert model.features == "normalised" and model.covariance_type == "full"
    expected = [hand_log_likelihood(x, WEIGHTS, MEANS, COVARIANCES["full"]) for x in POINTS]
    assert model.log_likelihood(np.array(POINTS)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_em_increases_likelihood_and_finds_separated_clusters(covariance):
    rng = np.random.default_rng(0)
    overlapping = np.concatenate([rng.normal(-1.5, 1, (300, 2)), rng.normal(1.5, 0.7, (300, 2))])
    history = fit_gmm(overlapping, 2, seed=0, covariance=covariance, reg_covar=1e-6).history
    assert len(history) > 3
    assert np.all(np.diff(history) >= -1e-10)

    centres = np.array([[-6.0, 2.0], [5.0, -3.0]])
    separated = np.concatenate([rng.normal(c, 0.5, (200, 2)) for c in centres])
    model = fit_gmm(separated, 2, seed=3, covariance=covariance, reg_covar=1e-6)
    order = np.argsort(model.means[:, 0])
    assert np.allclose(model.means[order], centres, atol=0.15)
    assert np.allclose(model.weights, 0.5, atol=0.01)


def test_our_mixture_ranks_real_above_noise_and_round_trips(clip, tmp_path):
    model = fit_quality_model(clip(scenes(range(120))), k=3, seed=0, holdout=0.25)
    assert model.reference.size == 30 and model.features == "raw"
    real = model.log_likelihood(clip(scenes(range(1000, 1040))))
    noise = model.log_likelihood(clip(torch.rand(40, 3, 48, 48)))
    assert 0 <= percentile_quality_score(noise, model.reference) < 25
    assert percentile_quality_score(real, model.reference) > 25
    assert np.median(real) > np.median(noise)

    save_quality_model(model, tmp_path / "qs.npz")
    loaded = load_quality_model(tmp_path / "qs.npz")
    assert np.array_equal(
        loaded.log_likelihood(clip(scenes(range(5)))), model.log_likelihood(clip(scenes(range(5))))
    )
    assert (loaded.features, loaded.source) == ("raw", "fit-qs")


def real_folder(root: Path, count: int) -> Path:
    root.mkdir()
    for index, image in enumerate(scenes(range(count), size=40)):
        to_pil(image).save(root / f"{index:03d}.png")
    return root


def test_fit_qs_command_writes_a_usable_mixture(clip, cache_dir, tmp_path):
    real = real_folder(tmp_path / "real", 24)
    out = tmp_path / "qs.npz"
    command = [sys.executable, "-m", "pbe_lightning.metrics", "fit-qs", "--real", str(real)]
    command += ["--clip", f"local-dir:{tiny_clip_folder(cache_dir)}", "--out", str(out)]
    command += ["--k", "2", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_quality_model(out)
    assert model.means.shape == (2, clip.num_features)
    assert model.reference.size == 5 and model.clip.startswith("local-dir:")
    assert model.features == "raw"  # the paper's features, unless --features normalised


def test_fit_qs_command_says_when_there_are_too_few_images_for_k(cache_dir, tmp_path):
    real = real_folder(tmp_path / "real", 6)
    out = tmp_path / "qs.npz"
    args = ["fit-qs", "--real", str(real), "--out", str(out), "--device", "cpu"]
    args += ["--clip", f"local-dir:{tiny_clip_folder(cache_dir)}"]
    # The default k=20 on 6 images (5 fitted, 1 held out): one line, not EM's traceback.
    with pytest.raises(SystemExit) as info:
        metrics_main(args)
    message = str(info.value.code)
    assert "\n" not in message and message.startswith("fit-qs: 6 images in")
    assert "(5 to fit after --holdout 0.2) cannot fit --k 20" in message
    assert "lower --k (at most 5)" in message
    assert not out.exists()
    with pytest.raises(SystemExit, match="--real .*nope"):
        metrics_main(["fit-qs", "--real", str(tmp_path / "nope"), *args[3:]])


# --- region CLIP score -----------------------------------------------------------------------
def test_mask_bounding_box_follows_the_white_is_edit_convention():
    mask = Image.new("L", (40, 30))
    mask.paste(255, (5, 7, 21, 19))  # PIL box: end exclusive, like ours
    assert mask_bounding_box(mask) == (5, 7, 21, 19)
    as_tensor = torch.from_numpy(np.asarray(mask) / 255.0)[None]
    assert mask_bounding_box(as_tensor) == (5, 7, 21, 19)
    with pytest.raises(ValueError, match="no white"):
        mask_bounding_box(torch.zeros(8, 8))


def test_region_clip_score_crops_and_resizes_as_the_public_tool(clip, open_clip_model):
    edits = [(torch.rand(1, 3, 96, 96) * 255).round() / 255 for _ in range(2)]
    boxes = [(4, 10, 84, 70), (20, 16, 60, 96)]  # mask boxes, end exclusive
    references = [scenes(range(k, k + 1), size=56 + 8 * k)[0] for k in range(2)]
    scores = region_clip_scores(edits, boxes, references, clip)
    for edit, (x0, y0, x1, y1), reference, score in zip(edits, boxes, references, scores):
        # Between the first and the last white pixel, the last row and column left out;
        # bilinear, no antialiasing, to 32x32. The reference: PIL bicubic to 32x32.
        crop = edit[..., y0 : y1 - 1, x0 : x1 - 1]
        region = F.interpolate(crop, (32, 32), mode="bilinear", align_corners=False)
        ref = np.asarray(to_pil(reference).resize((32, 32), Image.Resampling.BICUBIC))
        with torch.no_grad():
            a = open_clip_model.encode_image((region - clip.mean) / clip.std, normalize=True)
            b = open_clip_model.encode_image(normalised(ref, clip), normalize=True)
        assert score == pytest.approx(100 * float((a * b).sum()), abs=1e-4)


def test_edit_scores_select_by_name_and_skip_what_they_cannot_compute(clip):
    scores = EditScores(clip)  # the paper's: fid_clip, qs, clip_score
    # Rank zero scores alone during training: computing must not wait for the other ranks.
    assert scores.scores["fid_clip"].metric.sync_on_compute is False
    assert list(scores.scores) == ["fid_clip", "clip_score"]
    assert "import-gmm" in scores.skipped["qs"] and "fit-qs" in scores.skipped["qs"]
    with pytest.raises(ValueError, match="no edits"):
        scores.compute()
    imported = GaussianMixture(
        np.ones(1), np.zeros((1, clip.num_features)), np.ones(1), "spherical"
    )
    percentile = EditScores(clip, imported, metrics=["qs", "qs_percentile"])
    assert list(percentile.scores) == ["qs"] and "fit-qs" in percentile.skipped["qs_percentile"]
    with pytest.raises(ValueError, match="unknown .*fid_clip_normalised"):
        EditScores(clip, metrics=["fid_clip", "fid_clipp"])
    # One sample cannot give an FID; the other scores still can.
    single = EditScores(clip, metrics=["clip_score"])
    image = scenes(range(1))
    single.add_real([image])
    assert single.add_edits([image], [(0, 0, 48, 48)], [image]) == single.clip_scores
    assert list(single.compute()) == ["clip_score"]
