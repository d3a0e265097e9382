"""evaluate.py on a tiny COCOEE benchmark: metrics, grid, resumability, per-item seeding."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from pbe_lightning.demo.dataset import demo_scene
from pbe_lightning.demo.tiny_models import tiny_clip_folder
from pbe_lightning.evaluate import evaluate
from pbe_lightning.metrics import (
    ClipFeatures,
    fit_quality_model,
    folder_features,
    save_quality_model,
)
from tests.helpers.config import CONF, REPO

spec = importlib.util.spec_from_file_location("make_cocoee", REPO / "data" / "make_cocoee.py")
make_cocoee = importlib.util.module_from_spec(spec)
sys.modules["make_cocoee"] = make_cocoee  # dataclasses resolve annotations via sys.modules
spec.loader.exec_module(make_cocoee)

ITEMS = 5


def build_benchmark(root: Path) -> Path:
    """COCO-format scenes of several non-square sizes -> data/make_cocoee.py -> a benchmark."""
    images = root / "images"
    images.mkdir(parents=True)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    for i in range(ITEMS + 1):
        scene = demo_scene(np.random.default_rng([3, i]), 96)[0].resize((88 + 8 * i, 72))
        scene.save(images / f"{i:04d}.png")
        coco["images"].append({"id": i, "file_name": f"{i:04d}.png", "width": 88 + 8 * i})
        coco["images"][-1]["height"] = 72
        for j, box in enumerate([[8, 10, 30, 25], [44, 24, 30, 40]]):
            annotation = {"id": 10 * i + j, "image_id": i, "category_id": j + 1, "bbox": box}
            coco["annotations"].append(annotation)
    (root / "instances.json").write_text(json.dumps(coco))
    make_cocoee.build_cocoee(root / "instances.json", images, root / "bench", count=ITEMS)
    return root / "bench"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir, tiny_checkpoint) -> dict:
    root = tmp_path_factory.mktemp("eval")
    real = root / "real"
    real.mkdir()
    for i in range(8):
        demo_scene(np.random.default_rng([9, i]), 72)[0].save(real / f"{i}.png")
    clip_arch = f"local-dir:{tiny_clip_folder(cache_dir)}"
    quality = fit_quality_model(folder_features(real, ClipFeatures.load(clip_arch)), k=2)
    quality.clip = clip_arch
    save_quality_model(quality, root / "qs.npz")
    args = [
        f"ckpt_path={tiny_checkpoint}",
        f"benchmark={build_benchmark(root)}",
        f"real_images={real}",
        f"clip.arch={clip_arch}",
        "steps=2",
        "batch_size=2",
    ]
    return {"root": root, "args": args, "qs": root / "qs.npz"}


def eval_config(out: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def edit_files(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "edits").glob("*.png")}


@pytest.fixture(scope="module")
def full_run(setup) -> tuple[Path, dict]:
    """``python evaluate.py`` as a user runs it: all items, QS model given."""
    out = setup["root"] / "full"
    command = [sys.executable, str(REPO / "evaluate.py"), *setup["args"]]
    command += [f"qs_model={setup['qs']}", f"hydra.run.dir={out}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.loads((out / "metrics.json").read_text())


def test_command_writes_metrics_and_a_rerun_paints_nothing(setup, full_run):
    out, report = full_run
    assert report["counts"] == {"items": ITEMS, "painted_this_run": ITEMS, "real_images": 8}
    assert all(math.isfinite(report["metrics"][k]) for k in ("fid_clip", "qs", "clip_score"))
    assert report["config"]["resolution"] == 64  # from the training run's config
    manifest = json.loads((out.parent / "bench" / "manifest.json").read_text())
    for item in manifest["items"]:
        source = Image.open(out.parent / "bench" / item["source"])
        assert Image.open(out / "edits" / f"{item['id']}.png").size == source.size
    assert Image.open(out / "grid.png").size[1] > ITEMS * 64
    before = edit_files(out)

    # In-process this time, with W&B (offline): nothing repainted, the same numbers.
    again = evaluate(eval_config(out, *setup["args"], f"qs_model={setup['qs']}", "logger=wandb"))
    assert again["counts"]["painted_this_run"] == 0
    assert edit_files(out) == before
    assert again["metrics"] == report["metrics"]
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/eval/*.json"))
    assert tables and len(json.loads(tables[0].read_text())["data"]) == ITEMS


def test_an_interrupted_run_resumes_to_the_same_edits(setup, full_run):
    out = setup["root"] / "resumed"
    partial = evaluate(eval_config(out, *setup["args"], "limit=3"))  # chunk [2, 3) padded
    assert partial["counts"]["painted_this_run"] == 3
    assert partial["metrics"]["qs"] is None and "fit-qs" in partial["skipped"]["qs"]
    first = edit_files(out)
    resumed = evaluate(eval_config(out, *setup["args"]))  # repaints chunk [2, 4) for item 3
    assert resumed["counts"]["painted_this_run"] == ITEMS - 3
    finished = edit_files(out)
    assert all(finished[name] == first[name] for name in first)  # never rewritten
    # Per-item seeding: the same pixels as the uninterrupted run.
    uninterrupted = edit_files(full_run[0])
    assert {k: v[1] for k, v in finished.items()} == {k: v[1] for k, v in uninterrupted.items()}
    for key in ("fid_clip", "clip_score"):
        assert resumed["metrics"][key] == full_run[1]["metrics"][key]
    with pytest.raises(ValueError, match="other settings"):
        evaluate(eval_config(out, *setup["args"], "steps=3"))


def test_inception_fid_needs_torch_fidelity(setup):
    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed here")
    weights = setup["root"] / "inception.pth"
    weights.write_bytes(b"not used")
    out = setup["root"] / "inception"
    cfg = eval_config(out, *setup["args"], f"inception_weights={weights}")
    with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
        evaluate(cfg)
    assert not (out / "edits").exists()  # refused before any painting
