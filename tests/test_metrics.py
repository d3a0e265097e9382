"""COCOEE metrics against their definitions, on the tiny open_clip model (32 px input)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pbe_lightning.demo.dataset import demo_scene
from pbe_lightning.demo.tiny_models import tiny_clip_folder
from pbe_lightning.images import mask_bounding_box
from pbe_lightning.metrics import (
    ClipFeatures,
    EditScores,
    clip_fid,
    clip_fid_metric,
    fit_gmm,
    fit_quality_model,
    load_quality_model,
    quality_score,
    region_clip_score,
    save_quality_model,
)
from pbe_lightning.metrics import main as metrics_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clip(cache_dir: Path) -> ClipFeatures:
    return ClipFeatures.load(f"local-dir:{tiny_clip_folder(cache_dir)}")


def scenes(seeds: range, size: int = 48) -> torch.Tensor:
    """Demo scenes (textured backgrounds with shapes): the 'real' images, float in [0, 1]."""
    arrays = [np.asarray(demo_scene(np.random.default_rng([7, s]), size)[0]) for s in seeds]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_clip_features_are_unit_norm_and_preprocess_like_clip(clip):
    images = torch.rand(3, 3, 40, 56)
    features = clip(images)
    assert features.shape == (3, clip.num_features)
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Shorter side to 32 px, then the centre 32x32: the same as cropping first, then resizing.
    square = torch.nn.functional.interpolate(images, (32, 45), mode="bicubic", antialias=True)
    expected = clip.embed(square.clamp(0, 1)[..., 6:38])
    assert torch.allclose(features, expected, atol=1e-6)
    uint8 = (images * 255).round().to(torch.uint8)
    assert torch.allclose(clip(uint8), clip(uint8.float() / 255), atol=1e-6)


def test_clip_features_keep_clips_projection(clip, cache_dir):
    import open_clip

    model = open_clip.create_model(f"local-dir:{tiny_clip_folder(cache_dir)}").eval()
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.encode_image((pixels - clip.mean) / clip.std, normalize=True)
    assert torch.allclose(clip(pixels), expected, atol=1e-6)


def test_clip_features_refuse_hub_tags():
    with pytest.raises(FileNotFoundError):
        ClipFeatures.load("ViT-B-32", "openai")


def test_frechet_distance_matches_its_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (500, 1)), rng.normal(2, 3, (400, 1))
    # In 1-D: (m1 - m2)^2 + (s1 - s2)^2 with unbiased standard deviations.
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert clip_fid(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-9)
    x, y = torch.randn(200, 8, dtype=torch.float64), torch.randn(200, 8, dtype=torch.float64)
    y = y @ torch.randn(8, 8, dtype=torch.float64) + 1
    from torchmetrics.image.fid import _compute_fid

    reference = _compute_fid(x.mean(0), torch.cov(x.T), y.mean(0), torch.cov(y.T))
    assert clip_fid(x, y) == pytest.approx(float(reference), rel=1e-8)


def test_clip_fid_zero_for_identical_sets_larger_for_distinct(clip):
    real = scenes(range(48))
    real_features = clip(real)
    spread = float(torch.cov(real_features.T).trace())
    assert abs(clip_fid(real_features, real_features)) < 1e-3 * spread
    noise = torch.rand(48, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    noise_features = clip(noise)
    assert clip_fid(real_features, noise_features) > 0.1 * spread

    metric = clip_fid_metric(clip)
    metric.update(real, real=True)
    metric.update(real, real=False)
    assert abs(float(metric.compute())) < 1e-3 * spread
    metric.reset()
    metric.update(real, real=True)
    metric.update(noise, real=False)
    assert float(metric.compute()) == pytest.approx(
        clip_fid(real_features, noise_features), rel=1e-3
    )


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


def test_quality_score_ranks_real_above_noise_and_round_trips(clip, tmp_path):
    model = fit_quality_model(clip(scenes(range(120))), k=3, seed=0, holdout=0.25)
    assert model.reference.size == 30
    unseen_real = quality_score(clip(scenes(range(1000, 1040))), model)
    generator = torch.Generator().manual_seed(0)
    noise = quality_score(clip(torch.rand(40, 3, 48, 48, generator=generator)), model)
    assert 0 <= noise < unseen_real <= 100
    assert unseen_real > 25

    path = tmp_path / "qs.npz"
    save_quality_model(model, path)
    loaded = load_quality_model(path)
    assert quality_score(clip(scenes(range(5))), loaded) == quality_score(
        clip(scenes(range(5))), model
    )


def test_quality_score_is_the_mean_percentile_among_the_reference():
    model = fit_gmm(np.random.default_rng(0).normal(0, 1, (50, 2)), 1)
    samples = np.array([[0.0, 0.0], [3.0, 3.0], [6.0, 6.0]])
    model.reference = np.sort(model.log_likelihood(np.random.default_rng(1).normal(0, 1, (99, 2))))
    likelihoods = model.log_likelihood(samples)
    expected = np.mean([(model.reference < v).mean() for v in likelihoods]) * 100
    assert quality_score(samples, model) == pytest.approx(expected)
    # A reference point itself sits at its mid-rank, so the reference set scores exactly 50.
    model.reference = np.sort(model.log_likelihood(samples))
    assert quality_score(samples, model) == pytest.approx(50)


def test_fit_qs_command_writes_a_usable_mixture(clip, cache_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    for index, image in enumerate(scenes(range(24), size=40)):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(real / f"{index:03d}.png")
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


def test_fit_qs_command_says_when_there_are_too_few_images_for_k(cache_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    for index, image in enumerate(scenes(range(6), size=40)):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(real / f"{index:03d}.png")
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


def test_mask_bounding_box_follows_the_white_is_edit_convention():
    mask = Image.new("L", (40, 30))
    mask.paste(255, (5, 7, 21, 19))  # PIL box: end exclusive, like ours
    assert mask_bounding_box(mask) == (5, 7, 21, 19)
    as_tensor = torch.from_numpy(np.asarray(mask) / 255.0)[None]
    assert mask_bounding_box(as_tensor) == (5, 7, 21, 19)
    with pytest.raises(ValueError, match="no white"):
        mask_bounding_box(torch.zeros(8, 8))


def test_region_clip_score_is_100_for_the_reference_itself(clip):
    generated = torch.rand(2, 3, 64, 64)
    boxes = [(4, 10, 40, 30), (20, 16, 60, 64)]
    references = [
        image[:, y0:y1, x0:x1].clone() for image, (x0, y0, x1, y1) in zip(generated, boxes)
    ]
    assert region_clip_score(generated, boxes, references, clip) == pytest.approx(100, abs=1e-3)

    others = list(scenes(range(2)))
    swapped = region_clip_score(generated, boxes, others, clip)
    assert swapped < 100 - 1e-2
    # The mean over items of 100 x cosine, each region squashed to 32 px.
    region = clip.embed(clip.prepare(generated[:1, :, 10:30, 4:40], "squash"))
    cosine = float((region * clip.embed(clip.prepare(others[0][None], "squash"))).sum())
    single = region_clip_score(generated[:1], boxes[:1], others[:1], clip)
    assert single == pytest.approx(100 * cosine, rel=1e-5)


def test_edit_scores_are_local_to_one_process_and_fid_is_optional(clip):
    scores = EditScores(clip)
    # Rank zero scores alone during training: computing must not wait for the other ranks.
    assert scores.fids["fid_clip"].sync_on_compute is False
    with pytest.raises(ValueError, match="no edits"):
        scores.compute()
    # One preview sample cannot give an FID; the other scores still can.
    single = EditScores(clip, fid=False)
    image = scenes(range(1))
    single.add_real([image])
    assert single.add_edits([image], [(0, 0, 48, 48)], [image]) == [pytest.approx(100, abs=1e-3)]
    assert single.compute() == {"clip_score": pytest.approx(100, abs=1e-3)}
