"""evaluate.py on tiny COCOEE benchmarks, in our layout and in the released one: metrics, grid,
resumability, per-item seeding."""

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

from pbe_lightning.benchmark import read_items
from pbe_lightning.demo.dataset import demo_scene
from pbe_lightning.demo.tiny_models import tiny_clip_folder
from pbe_lightning.evaluate import evaluate
from pbe_lightning.images import mask_bounding_box, read_image
from pbe_lightning.metrics import (
    ClipFeatures,
    fit_quality_model,
    folder_features,
    frechet_distance,
    load_quality_model,
    region_clip_scores,
    save_quality_model,
)
from pbe_lightning.metrics.cli import main as metrics_main
from tests.helpers.config import CONF, REPO
from tests.helpers.mixtures import SKLEARN, pickled_as

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
    return {"root": root, "args": args, "qs": root / "qs.npz", "real": real, "clip_arch": clip_arch}


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


# --- COCOEE as released ----------------------------------------------------------------------
RELEASED_IDS = ("000000000139", "000000000285", "000000000632", "000000001000")


def build_released(root: Path, size: int = 72) -> Path:
    """A folder in the released layout, real PNGs: GT_3500/<id>_GT.png (square sources),
    Ref_3500/<id>_ref.png (crops of other scenes), Mask_bbox_3500/<id>_mask.png (white box)."""
    folders = {name: root / name for name in ("GT_3500", "Ref_3500", "Mask_bbox_3500")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for k, item_id in enumerate(RELEASED_IDS):
        demo_scene(np.random.default_rng([4, k]), size)[0].save(
            folders["GT_3500"] / f"{item_id}_GT.png"
        )
        other = demo_scene(np.random.default_rng([6, k]), 96)[0]
        other.crop((10 + k, 20, 60 + 3 * k, 80)).save(folders["Ref_3500"] / f"{item_id}_ref.png")
        mask = Image.new("L", (size, size))
        mask.paste(255, (8 + 4 * k, 12, 40 + 5 * k, 50))
        mask.save(folders["Mask_bbox_3500"] / f"{item_id}_mask.png")
    (folders["GT_3500"] / "Thumbs.db").write_bytes(b"not an item")
    return root


@pytest.fixture(scope="module")
def released(setup) -> dict:
    """The released layout scored with the paper's metrics, QS from an imported mixture."""
    root = setup["root"] / "released"
    bench = build_released(root / "COCOEE")
    clip_arch = setup["clip_arch"]
    fitted = fit_quality_model(folder_features(setup["real"], ClipFeatures.load(clip_arch)), k=2)
    state = {
        "covariance_type": "full",
        "weights_": fitted.weights,
        "means_": fitted.means,
        "precisions_cholesky_": fitted.precisions_cholesky,
    }
    (root / "gmm.pkl").write_bytes(pickled_as(SKLEARN, "GaussianMixture", state, 4))
    metrics_main(
        [
            "import-gmm",
            str(root / "gmm.pkl"),
            "--out",
            str(root / "qs_gmm.npz"),
            "--clip",
            clip_arch,
        ]
    )
    args = [a for a in setup["args"] if not a.startswith("benchmark=")]
    args += [f"benchmark={bench}", f"qs_model={root / 'qs_gmm.npz'}"]
    out = root / "run"
    report = evaluate(eval_config(out, *args))
    return {
        "bench": bench,
        "out": out,
        "args": args,
        "qs_model": root / "qs_gmm.npz",
        "report": report,
    }


def test_the_released_layout_is_painted_and_every_item_scored(setup, released):
    out, report, bench = released["out"], released["report"], released["bench"]
    assert report["counts"]["items"] == report["counts"]["painted_this_run"] == len(RELEASED_IDS)
    assert sorted(p.name for p in (out / "edits").glob("*.png")) == [
        f"{i}.png" for i in RELEASED_IDS
    ]
    paper = {"fid_clip", "qs", "clip_score"}
    assert set(report["metrics"]) == paper | {"exemplar_following", "shape_following", "leakage"}
    # COCOEE records no exemplar's truth: those are null, and say why.
    assert set(report["skipped"]) == set(report["metrics"]) - paper
    assert all(report["metrics"][k] is None for k in report["skipped"])
    assert "no ground truth" in report["skipped"]["exemplar_following"]
    assert 0 <= report["metrics"]["qs"] <= 100
    # Every item is in the numbers: rescored here from the files, independently of evaluate
    # (CLIP in other batch sizes: float32 sums in another order, hence rel=1e-4).
    clip = ClipFeatures.load(setup["clip_arch"])
    real, edits = folder_features(setup["real"], clip), folder_features(out / "edits", clip)
    assert report["metrics"]["fid_clip"] == pytest.approx(frechet_distance(real, edits), rel=1e-4)
    per_item = region_clip_scores(
        [read_image(out / "edits" / f"{i}.png") for i in RELEASED_IDS],
        [
            mask_bounding_box(Image.open(bench / "Mask_bbox_3500" / f"{i}_mask.png"))
            for i in RELEASED_IDS
        ],
        [read_image(bench / "Ref_3500" / f"{i}_ref.png") for i in RELEASED_IDS],
        clip,
    )
    assert report["metrics"]["clip_score"] == pytest.approx(sum(per_item) / len(per_item), rel=1e-6)
    model = load_quality_model(released["qs_model"])
    lls = model.log_likelihood(edits)
    assert report["metrics"]["qs"] == pytest.approx(100 * np.clip(lls / 300, 0, 1).mean(), rel=1e-4)
    # The paper's painting: PLMS (pndm), fp16 autocast, the raw decoded output.
    settings = json.loads((out / "edits" / "settings.json").read_text())
    assert (settings["sampler"], settings["precision"], settings["paste_back"]) == (
        "pndm",
        "fp16",
        False,
    )

    again = evaluate(eval_config(out, *released["args"]))  # resumable: nothing painted again
    assert again["counts"]["painted_this_run"] == 0 and again["metrics"] == report["metrics"]


def test_the_defaults_are_the_papers_evaluation(tmp_path):
    cfg = eval_config(tmp_path, "ckpt_path=x.ckpt", "benchmark=COCOEE", "real_images=test_set_GT")
    assert list(cfg.metrics) == ["fid_clip", "qs", "clip_score"]
    assert cfg.clip.arch == "ViT-B-32-quickgelu"  # OpenAI's ViT-B/32
    painting = (cfg.sampler, cfg.steps, cfg.guidance_scale, cfg.precision, cfg.paste_back)
    assert painting == ("pndm", 50, 5.0, "fp16", False)  # PLMS, 50, 5, fp16, raw output


def test_a_folder_of_neither_layout_says_what_a_benchmark_holds(tmp_path):
    build_released(tmp_path / "download" / "test_bench")
    with pytest.raises(FileNotFoundError, match=r"did you mean benchmark=.*test_bench\?\)"):
        read_items(tmp_path / "download")
    with pytest.raises(FileNotFoundError, match="GT_3500/, Ref_3500/, Mask_bbox_3500/"):
        read_items(tmp_path)
    (tmp_path / "download" / "test_bench" / "Ref_3500" / f"{RELEASED_IDS[1]}_ref.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"Ref_3500/{RELEASED_IDS[1]}_ref.png"):
        read_items(tmp_path / "download" / "test_bench")
