"""The demo world and the demo's "pretrained" VAE and CLIP: they must reconstruct and see."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from pbe_lightning.demo import pretrain
from pbe_lightning.demo.dataset import demo_scene
from pbe_lightning.demo.tiny_models import (
    DEMO_VAE,
    TINY_CLIP,
    VAE_TRAINING,
    demo_clip_folder,
    demo_sd_folder,
    tiny_clip_folder,
)
from pbe_lightning.demo.world import SHAPES, random_scene, silhouette
from pbe_lightning.metrics.features import ClipFeatures
from pbe_lightning.models import lr_schedules
from pbe_lightning.models.backbone import load_backbone
from pbe_lightning.models.encoder import build_exemplar_encoder
from pbe_lightning.models.samplers import encode_latents
from pbe_lightning.utils.instantiators import instantiate
from tests.helpers.config import compose_config

RESOLUTION = VAE_TRAINING["resolution"]


def test_a_scene_is_its_background_with_its_objects_drawn_in():
    scene = random_scene(np.random.default_rng(4), 96)
    again = random_scene(np.random.default_rng(4), 96)
    assert np.array_equal(scene.pixels, again.pixels)
    expected = scene.background
    for thing in scene.objects:
        alpha = silhouette(thing.shape, thing.box, 96)[..., None]
        expected = expected * (1 - alpha) + np.asarray(thing.colour) * alpha
    assert np.allclose(scene.pixels, expected)
    image, record = demo_scene(np.random.default_rng(4), 96)
    assert record["labels"] == [t.shape for t in scene.objects]
    assert len(record["boxes"]) == len(scene.objects) and image.size == (96, 96)


def test_objects_contrast_with_the_background_under_them():
    for seed in range(20):
        scene = random_scene(np.random.default_rng([9, seed]), 128)
        for thing in scene.objects:
            x0, y0, x1, y1 = (int(round(v)) for v in thing.box)
            under = scene.background[y0:y1, x0:x1].reshape(-1, 3).mean(0)
            assert np.linalg.norm(np.asarray(thing.colour) - under) >= 0.3 - 1e-6


def test_the_codec_init_reconstructs_before_any_training_and_a_random_vae_does_not():
    torch.manual_seed(0)
    codec = pretrain.codec_init(AutoencoderKL(**DEMO_VAE))
    random = AutoencoderKL(**DEMO_VAE)
    assert pretrain.reconstruction_psnr(codec, RESOLUTION, count=16) > 18.0
    assert pretrain.reconstruction_psnr(random, RESOLUTION, count=16) < 12.0


def test_the_codec_init_needs_one_norm_group():
    with pytest.raises(ValueError, match="norm_num_groups=1"):
        pretrain.codec_init(AutoencoderKL(**{**DEMO_VAE, "norm_num_groups": 8}))


@pytest.mark.slow
def test_the_demo_vae_is_a_diffusers_folder_that_reconstructs_held_out_scenes(cache_dir):
    """The whole pretraining, once per cache (about a minute on two busy cores)."""
    backbone = load_backbone(str(demo_sd_folder(cache_dir)))
    vae = backbone.vae
    assert pretrain.reconstruction_psnr(vae, RESOLUTION) > 21.0
    # Scaled latents have unit std, as SD's 0.18215 gives SD's VAE.
    scenes = pretrain.world_scenes(0, pretrain.HELD_OUT_STREAM, 32)
    crops = pretrain.random_crops(scenes, 32, RESOLUTION, torch.Generator().manual_seed(1))
    with torch.no_grad():
        latents = encode_latents(vae, crops * 2 - 1, torch.Generator().manual_seed(0))
    assert 0.75 < float(latents.std()) < 1.33
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4


def probe_accuracy(folder) -> float:
    """Nearest-of-4 colour identification from a linear probe on the pooled token."""
    encoder = build_exemplar_encoder(f"local-dir:{folder}", 8)
    generator = torch.Generator().manual_seed(3)
    size = TINY_CLIP["vision_cfg"]["image_size"]
    train, train_colour, _ = pretrain.object_crops(5, 11, 600, size, generator)
    test, test_colour, _ = pretrain.object_crops(5, 12, 200, size, generator)
    with torch.no_grad():
        features = [encoder.clip_features(x)[:, 0] for x in (train, test)]
    ones = [torch.cat([f, torch.ones(len(f), 1)], 1) for f in features]
    weights = torch.linalg.lstsq(ones[0], train_colour, driver="gelsd").solution
    predicted = ones[1] @ weights
    distractors = torch.rand(len(test), 3, 3, generator=generator)
    candidates = torch.cat([test_colour[:, None], distractors], 1)
    nearest = (candidates - predicted[:, None]).norm(dim=2).argmin(1)
    return float((nearest == 0).float().mean())


@pytest.mark.slow
def test_the_demo_clips_pooled_token_tells_exemplar_colours_apart(cache_dir):
    trained, random = (
        probe_accuracy(demo_clip_folder(cache_dir)),
        probe_accuracy(tiny_clip_folder(cache_dir)),
    )
    assert trained > 0.8 and trained > random + 0.1, (trained, random)


def test_shapes_are_distinct_silhouettes():
    masks = [silhouette(shape, (2, 2, 30, 30), 32) > 0.5 for shape in SHAPES]
    for i, a in enumerate(masks):
        for b in masks[:i]:
            assert (a & b).sum() / (a | b).sum() < 0.9


def test_a_demo_run_with_another_encoder_still_finds_its_metrics_clip(tmp_path):
    """ablation=encoder swaps model/encoder=demo (which trains the demo's CLIP) for the tiny
    towers; the metrics CLIP (metrics_clip.arch) must still be there on a fresh cache."""
    cfg = compose_config(tmp_path / "run", tmp_path / "cache", "model/encoder=clip")
    folder = Path(cfg.metrics_clip.arch.removeprefix("local-dir:"))
    assert not folder.exists()
    instantiate(cfg.model.backbone)  # what every demo run builds, whatever its encoder
    assert ClipFeatures.load(cfg.metrics_clip.arch, None) is not None


def test_a_training_hole_from_a_recorded_box_hides_the_whole_object():
    """Boxes are recorded with a margin: a hole drawn from the box (or the public code's
    outline around it) still covers the object, so no sliver of its colour stays in context."""
    size, margin = 128, 3  # px the object keeps from each box side that is not the scene's edge
    for seed in range(20):
        scene = random_scene(np.random.default_rng([0, seed]), size)
        _, record = demo_scene(np.random.default_rng([0, seed]), size)
        for thing, (x0, y0, x1, y1) in zip(scene.objects, record["boxes"]):
            ys, xs = np.mgrid[0:size, 0:size] + 0.5
            inside = (
                (xs > (x0 + margin if x0 > 0 else 0))
                & (xs < (x1 - margin if x1 < size else size))
                & (ys > (y0 + margin if y0 > 0 else 0))
                & (ys < (y1 - margin if y1 < size else size))
            )
            alpha = silhouette(thing.shape, thing.box, size)
            assert alpha[~inside].max(initial=0) == 0, (seed, thing.shape)


def test_the_demo_learning_rate_warms_up_then_decays_to_zero_at_its_last_step(tiny_cfg):
    cfg = tiny_cfg("experiment=demo", "trainer.max_steps=300")
    assert cfg.model.lr_scheduler.total_steps == 300  # follows trainer.max_steps
    warmup = cfg.model.lr_scheduler.warmup_steps
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = instantiate(cfg.model.lr_scheduler)(optimizer)
    factors = []
    for _ in range(300):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert factors[0] == 0.0 and factors[warmup] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(factors[warmup:], factors[warmup + 1 :]))
    assert factors[-1] < 1e-3


def test_a_run_shorter_than_the_warmup_still_warms_up_and_decays():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = lr_schedules.warmup_cosine(optimizer, warmup_steps=50, total_steps=6)
    factors = []
    for _ in range(6):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert factors[0] == 0.0 and max(factors) == pytest.approx(1.0) and factors[-1] < 0.3
