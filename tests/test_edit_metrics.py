"""callbacks.edit_metrics: the paper's metrics on the validation preview while training, scored
by the same code as evaluate.py; off by default, on in experiment=paper and the ablation grids."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pbe_lightning.benchmark import Item
from pbe_lightning.callbacks.edit_metrics import EditMetrics
from pbe_lightning.demo.dataset import demo_scene
from pbe_lightning.demo.tiny_models import tiny_clip_folder
from pbe_lightning.evaluate import score
from pbe_lightning.images import save_atomically
from pbe_lightning.metrics import (
    ClipFeatures,
    EditScores,
    fit_quality_model,
    load_quality_model,
    save_quality_model,
)
from pbe_lightning.metrics.exemplar import colour_following, flat_exemplar, leakage
from pbe_lightning.train import train
from pbe_lightning.utils.instantiators import instantiate
from tests.helpers.config import compose_config

METRICS = ("val/fid_clip", "val/clip_score", "val/qs")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> dict:
    """One tiny run of the mask ablation's recipe (debug=tiny: 4 steps, a validation every 2,
    2 preview samples) with a QS mixture, recording what the callback fed to the scorer."""
    root = tmp_path_factory.mktemp("edit_metrics")
    cfg = compose_config(root / "run", cache_dir, "ablation=mask")
    arch = cfg.callbacks.edit_metrics.clip.arch
    assert arch == f"local-dir:{tiny_clip_folder(cache_dir)}"  # generated now if not yet
    clip = ClipFeatures.load(arch)
    scenes = [demo_scene(np.random.default_rng([5, i]), 64)[0] for i in range(12)]
    pixels = torch.stack([torch.from_numpy(np.asarray(s).copy()) for s in scenes])
    quality = fit_quality_model(clip(pixels.permute(0, 3, 1, 2)), k=2)
    quality.clip = arch
    save_quality_model(quality, root / "qs.npz")
    OmegaConf.update(cfg, "callbacks.edit_metrics.qs_model", str(root / "qs.npz"))

    fed: list[dict] = []  # one entry per scorer (= per measured validation)
    add_real, add_edits = EditScores.add_real, EditScores.add_edits

    def entry(scores: EditScores) -> dict:
        if not fed or fed[-1]["scores"] is not scores:
            fed.append({"scores": scores, "real": [], "edits": [], "boxes": [], "refs": []})
        return fed[-1]

    def record_real(self, images):
        entry(self)["real"] += [image.cpu().clone() for image in images]
        return add_real(self, images)

    def record_edits(self, edits, boxes, references, known=None):
        record = entry(self)
        record["edits"] += [edit.cpu().clone() for edit in edits]
        record["boxes"] += list(boxes)
        record["refs"] += [reference.cpu().clone() for reference in references]
        record["known"] = record.get("known", []) + list(known or [None] * len(edits))
        return add_edits(self, edits, boxes, references, known)

    rng_kept = []  # whether a measurement left the global RNG as it found it
    measure = EditMetrics.measure

    def watch_rng(self, trainer, pl_module):
        before = torch.get_rng_state()
        values = measure(self, trainer, pl_module)
        rng_kept.append(torch.equal(before, torch.get_rng_state()))
        return values

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EditScores, "add_real", record_real)
        patch.setattr(EditScores, "add_edits", record_edits)
        patch.setattr(EditMetrics, "measure", watch_rng)
        metrics = train(cfg)
    with open(root / "run" / "csv" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    paper = [entry for entry in fed if entry["real"]]  # the swapped-exemplar scorers have none
    return {
        "root": root,
        "cfg": cfg,
        "metrics": metrics,
        "rows": rows,
        "fed": paper,
        "rng": rng_kept,
    }


def test_off_by_default_on_in_the_recipes_and_every_ablation(tiny_cfg):
    assert tiny_cfg("~experiment").callbacks.edit_metrics.every_n_validations == 0
    demo = tiny_cfg().callbacks.edit_metrics  # under 5% of the demo's time: on
    assert demo.every_n_validations == 1 and demo.clip.arch.startswith("local-dir:")
    paper = tiny_cfg("experiment=paper").callbacks.edit_metrics
    assert paper.every_n_validations == 1 and paper.clip.arch == "ViT-B-32-quickgelu"
    for name in ("augment", "bottleneck", "cfg", "mask"):
        for recipe, arch in (("demo", "local-dir:"), ("paper", "ViT-B-32-quickgelu")):
            node = tiny_cfg(f"experiment={recipe}", f"ablation={name}").callbacks.edit_metrics
            assert node.every_n_validations == 1, (recipe, name)
            assert node.clip.arch.startswith(arch), (recipe, name)


def test_training_logs_the_metrics_at_each_validation(trained):
    rows = [row for row in trained["rows"] if row["val/loss"]]
    assert len(rows) == 2  # steps 2 and 4
    for row in rows:  # in the validation's own row: W&B and CSV plot them per step
        for key in METRICS:
            assert math.isfinite(float(row[key])), (key, row)
        assert 0 < float(row["val/clip_score"]) <= 100 and 0 <= float(row["val/qs"]) <= 100
    assert all(not row[key] for row in trained["rows"] if not row["val/loss"] for key in METRICS)
    assert all(math.isfinite(trained["metrics"][key]) for key in METRICS)
    # Painting and loading the CLIP (first time) leave training's random numbers alone.
    assert trained["rng"] == [True, True]
    # The preview, painted with the same seed: both validations scored the same 2 sources.
    first, last = trained["fed"]
    assert len(first["real"]) == len(last["real"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(first["real"], last["real"]))


def test_logged_values_equal_evaluates_scoring_of_the_same_edits(trained):
    """The last validation's edits, saved as evaluate.py saves them, scored by evaluate's own
    ``score``: the numbers the callback logged."""
    fed, folder = trained["fed"][-1], trained["root"] / "as_evaluate"
    real, edits = folder / "real", folder / "edits"
    items = []
    for index, (edit, box, ref) in enumerate(zip(fed["edits"], fed["boxes"], fed["refs"])):
        save_atomically(edit, edits / f"{index}.png")
        save_atomically(ref, folder / "references" / f"{index}.png")
        mask = torch.zeros(1, 1, *edit.shape[-2:])
        x0, y0, x1, y1 = box
        mask[..., y0:y1, x0:x1] = 1  # white = edit: evaluate takes the box from the file
        save_atomically(mask.expand(-1, 3, -1, -1), folder / "masks" / f"{index}.png")
        mask_file, reference_file = folder / "masks" / f"{index}.png", folder / "references"
        items.append(
            Item(index, str(index), Path(), mask_file, reference_file / f"{index}.png", "")
        )
        # The painting is pasted into the hole: outside its box, the edit is the source.
        assert torch.equal(edit * (1 - mask), fed["real"][index] * (1 - mask))
    for index, image in enumerate(fed["real"]):
        save_atomically(image, real / f"{index:03d}.png")

    cfg = trained["cfg"].callbacks.edit_metrics
    clip = ClipFeatures.load(cfg.clip.arch)
    scores = EditScores(clip, load_quality_model(cfg.qs_model))
    options = OmegaConf.create({"real_images": str(real), "batch_size": len(items)})
    values, _, _ = score(items, edits, options, scores)
    logged = [row for row in trained["rows"] if row["val/loss"]][-1]
    for name in ("fid_clip", "clip_score", "qs"):
        assert float(logged[f"val/{name}"]) == pytest.approx(values[name], rel=1e-6, abs=1e-7)
    # And on the tensors themselves (no PNG round trip): the same, the edits being 8-bit.
    direct = EditScores(clip, load_quality_model(cfg.qs_model))
    direct.add_real(fed["real"])
    direct.add_edits(fed["edits"], fed["boxes"], fed["refs"])
    assert direct.compute() == pytest.approx(values, rel=1e-9, abs=1e-12)


def test_a_missing_metrics_clip_checkpoint_names_the_key(tiny_cfg, tmp_path):
    # experiment=paper needs the ViT-B/32 weights (metrics_clip.checkpoint: ???).
    cfg = tiny_cfg("experiment=paper")
    assert OmegaConf.is_missing(cfg.metrics_clip, "checkpoint")
    with pytest.raises(
        ValueError, match=r"metrics_clip.checkpoint is required .*every_n_validations=0"
    ):
        instantiate(cfg.callbacks.edit_metrics)
    cfg = tiny_cfg("experiment=paper", f"metrics_clip.checkpoint={tmp_path}/b32.bin")
    with pytest.raises(FileNotFoundError, match=r"metrics_clip.checkpoint=.*b32.bin: no such file"):
        instantiate(cfg.callbacks.edit_metrics)
    # Switched off, the recipe needs nothing.
    off = tiny_cfg("experiment=paper", "callbacks.edit_metrics.every_n_validations=0")
    assert instantiate(off.callbacks.edit_metrics).every == 0
    # Without a recipe's metrics_clip, switching it on says what to set.
    cfg = tiny_cfg("callbacks.edit_metrics.every_n_validations=1", "~metrics_clip")
    with pytest.raises(ValueError, match="set metrics_clip.arch"):
        instantiate(cfg.callbacks.edit_metrics)


def test_a_demo_clip_folder_that_is_not_there_fails_before_training(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "callbacks.edit_metrics.every_n_validations=1", f"metrics_clip.arch=local-dir:{tmp_path}"
    )
    with pytest.raises(FileNotFoundError, match="metrics_clip.arch=local-dir:"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_demo_logs_exemplar_following_and_leakage_of_swapped_exemplars(tmp_path, cache_dir):
    """experiment=demo paints its preview again with each sample's exemplar swapped for the
    next one's and logs the exemplar scores: the means of what each edit's truth gives."""
    cfg = compose_config(tmp_path / "run", cache_dir, "data.val_samples=8", "trainer.max_steps=2")
    assert {"exemplar_following", "leakage"} <= set(cfg.callbacks.edit_metrics.metrics)
    fed: list[tuple] = []
    add_edits = EditScores.add_edits

    def record(self, edits, boxes, references, known=None):
        if known is not None:
            fed.extend(zip(edits, references, known))
        return add_edits(self, edits, boxes, references, known)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EditScores, "add_edits", record)
        train(cfg)
    with open(tmp_path / "run" / "csv" / "version_0" / "metrics.csv") as file:
        logged = [row for row in csv.DictReader(file) if row["val/loss"]][-1]
    scored = [(edit, known) for edit, _, known in fed if known is not None]
    assert len(fed) == 8 and len(scored) >= 4  # most samples give a truth
    # Each edit was painted with the exemplar its truth describes: the next sample's.
    references = [reference for _, reference, _ in fed]
    for (_, _, known), reference in zip(fed, references):
        if known is not None:
            colour = flat_exemplar(reference[0].float()).colour
            assert known.truth.colour == pytest.approx(colour)
    followed = [colour_following(e[0], k.background, k.hole, k.truth)[0] for e, k in scored]
    leaked = [leakage(e[0], k.background, k.hole, k.truth) for e, k in scored]
    assert float(logged["val/exemplar_following"]) == pytest.approx(np.mean(followed))
    assert float(logged["val/leakage"]) == pytest.approx(np.mean(leaked))
