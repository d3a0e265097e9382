"""The toy benchmark: COCOEE layout, truth that matches its pixels, and scores that agree."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from pbe_lightning.callbacks.edit_metrics import OFF
from pbe_lightning.demo.benchmark import main as write_benchmark_cli
from pbe_lightning.demo.follow import main as follow_cli
from pbe_lightning.demo.tiny_models import tiny_clip_folder
from pbe_lightning.demo.world import silhouette
from pbe_lightning.evaluate import evaluate, read_items
from pbe_lightning.images import read_image, read_user_mask, resize
from pbe_lightning.metrics.exemplar import ExemplarTruth, score_item
from tests.helpers.config import CONF
from tests.helpers.processes import run_train

COUNT = 8


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_benchmark_cli(["--out", str(root), "--count", str(COUNT), "--seed", "3"])
    return root, json.loads((root / "manifest.json").read_text())


def item_tensors(root, item):
    source = read_image(root / item["source"])[0]
    mask = read_user_mask(root / item["mask"], (source.shape[-1], source.shape[-2]))[0, 0]
    return source, mask > 0.5, read_image(root / item["reference"])[0]


def test_evaluate_reads_it_as_a_cocoee_benchmark(bench):
    root, manifest = bench
    items = read_items(root)
    assert [i.id for i in items] == [e["id"] for e in manifest["items"]]
    assert all(i.source.is_file() and i.mask.is_file() and i.reference.is_file() for i in items)
    assert manifest["chance"] == {"colour_following": 0.25, "shape_following": 1 / 6}


def test_the_same_seed_writes_the_same_benchmark(bench, tmp_path):
    root, manifest = bench
    write_benchmark_cli(["--out", str(tmp_path), "--count", "2", "--seed", "3"])
    again = json.loads((tmp_path / "manifest.json").read_text())
    assert again["items"] == manifest["items"][:2]
    for key in ("source", "reference"):
        path = manifest["items"][1][key]
        assert (tmp_path / path).read_bytes() == (root / path).read_bytes()


def test_the_hole_is_the_recorded_box_on_background_only(bench):
    root, manifest = bench
    for item in manifest["items"]:
        source, hole, _ = item_tensors(root, item)
        x0, y0, x1, y1 = item["truth"]["hole_box"]
        box = torch.zeros_like(hole)
        box[y0:y1, x0:x1] = True
        assert torch.equal(hole, box) and item["box"] == [x0, y0, x1, y1]
        # No other object reaches into it: no pixel there has an object's colour.
        pixels = source[:, hole].T
        for thing in item["truth"]["source_objects"]:
            near = (pixels - torch.tensor(thing["colour"])).norm(dim=1) < 0.02
            assert near.float().mean() < 0.02


def test_the_exemplar_shows_the_recorded_object_on_the_recorded_background(bench):
    root, manifest = bench
    for item in manifest["items"]:
        truth = item["truth"]
        _, _, reference = item_tensors(root, item)
        size = reference.shape[-2:]
        inside = silhouette(truth["shape"], truth["exemplar_box"], max(size))[: size[0], : size[1]]
        inside = torch.from_numpy(inside)
        core, outside = inside > 0.99, inside < 0.01
        colour = reference[:, core].mean(1)
        background = reference[:, outside].mean(1)
        assert (colour - torch.tensor(truth["colour"])).abs().max() < 0.03
        assert (background - torch.tensor(truth["exemplar_background"])).abs().max() < 0.03


def test_candidates_are_apart_and_contrast_with_both_backgrounds(bench):
    root, manifest = bench
    for item in manifest["items"]:
        truth = item["truth"]
        candidates = torch.tensor([truth["colour"], *truth["distractor_colours"]])
        assert len(candidates) == manifest["distractors"] + 1
        gaps = torch.cdist(candidates, candidates) + torch.eye(len(candidates))
        assert gaps.min() >= 0.35 - 1e-3
        source, hole, _ = item_tensors(root, item)
        under = source[:, hole].mean(1)
        exemplar_bg = torch.tensor(truth["exemplar_background"])
        assert (candidates - under).norm(dim=1).min() >= 0.3 - 0.02
        assert (candidates - exemplar_bg).norm(dim=1).min() >= 0.3 - 1e-3
        assert (exemplar_bg - under).norm() >= 0.3 - 0.02
        assert item["swap"]["colour"] == truth["distractor_colours"][0]


def oracle_edit(source, truth) -> torch.Tensor:
    """The ideal edit: the exemplar's object, in its colour and shape, drawn into the hole on
    the scene's own background."""
    x0, y0, x1, y1 = truth["hole_box"]
    w, h = x1 - x0, y1 - y0
    box = (x0 + 0.15 * w, y0 + 0.15 * h, x1 - 0.15 * w, y1 - 0.15 * h)
    alpha = torch.from_numpy(silhouette(truth["shape"], box, source.shape[-1]))
    return source * (1 - alpha) + torch.tensor(truth["colour"])[:, None, None] * alpha


def pasted_edit(source, hole, reference, truth) -> torch.Tensor:
    x0, y0, x1, y1 = truth["hole_box"]
    out = source.clone()
    out[:, y0:y1, x0:x1] = resize(reference[None], (y1 - y0, x1 - x0))[0]
    return out


def test_an_oracle_edit_follows_without_leakage_and_a_pasted_exemplar_leaks(bench):
    root, manifest = bench
    shapes = {name: read_image(root / path)[0, 0] for name, path in manifest["shapes"].items()}
    oracle, pasted = [], []
    for item in manifest["items"]:
        source, hole, reference = item_tensors(root, item)
        truth = ExemplarTruth.from_manifest(item["truth"])
        oracle.append(score_item(oracle_edit(source, item["truth"]), source, hole, truth, shapes))
        pasted.append(
            score_item(pasted_edit(source, hole, reference, item["truth"]), source, hole, truth)
        )
    assert all(s.colour_followed and s.leakage == 0.0 for s in oracle)
    assert np.mean([s.shape_followed for s in oracle]) >= 0.75
    assert all(s.colour_followed for s in pasted)
    assert min(s.leakage for s in pasted) > 0.15


def test_evaluate_scores_exemplar_following_and_leakage_with_their_chance_levels(
    bench, tmp_path, cache_dir, tiny_checkpoint
):
    """evaluate.py on the toy benchmark: the exemplar scores are the per-item scores of its
    saved edits, recomputed here from the files; the chance levels are the manifest's."""
    root, manifest = bench
    overrides = [
        f"ckpt_path={tiny_checkpoint}",
        f"benchmark={root}",
        f"real_images={root / 'source'}",
        f"clip.arch=local-dir:{tiny_clip_folder(cache_dir)}",
        "steps=2",
        "batch_size=4",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    report = evaluate(cfg)
    assert report["chance"] == {"exemplar_following": 0.25, "shape_following": 1 / 6}
    assert not {"exemplar_following", "shape_following", "leakage"} & set(report["skipped"])
    shapes = {name: read_image(root / path)[0, 0] for name, path in manifest["shapes"].items()}
    scores = []
    for item in manifest["items"]:
        source, hole, _ = item_tensors(root, item)
        edit = read_image(tmp_path / "eval" / "edits" / f"{item['id']}.png")[0]
        truth = ExemplarTruth.from_manifest(item["truth"])
        scores.append(score_item(edit, source, hole, truth, shapes))
    metrics = report["metrics"]
    assert metrics["exemplar_following"] == np.mean([s.colour_followed for s in scores])
    assert metrics["shape_following"] == np.mean([s.shape_followed for s in scores])
    assert metrics["leakage"] == pytest.approx(np.mean([s.leakage for s in scores]))


@pytest.mark.slow
def test_training_the_demo_lifts_exemplar_following_well_above_chance(tmp_path, cache_dir):
    """The default demo run (``python train.py``, without its in-training edit metrics),
    then painted on a toy benchmark whose exemplars come from other scenes: the hole takes the
    exemplar's colour far more often than chance (0.25 with 3 distractors). About 6 minutes
    on two cores."""
    run = tmp_path / "run"
    result = run_train(
        [f"paths.output_dir={run}", OFF],
        cwd=tmp_path,
        cache=cache_dir,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    write_benchmark_cli(["--out", str(tmp_path / "toy"), "--count", "48", "--seed", "7"])
    out = tmp_path / "follow.json"
    follow_cli(
        ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--bench", str(tmp_path / "toy")]
        + ["--out", str(out)]
    )
    summary = json.loads(out.read_text())["summary"]
    assert summary["colour_chance"] == 0.25
    # 0.885 on 200 items (0.85 on these 48); 0.7 is over three standard errors below that with
    # 48 items, and above what the demo reached with a constant learning rate (0.61).
    assert summary["colour_following"] >= 0.7, summary
