"""The COCOEE builder on a tiny COCO-format fixture: selection rules, files, determinism."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "make_cocoee.py"

spec = importlib.util.spec_from_file_location("make_cocoee", SCRIPT)
make_cocoee = importlib.util.module_from_spec(spec)
sys.modules["make_cocoee"] = make_cocoee  # dataclasses resolve annotations via sys.modules
spec.loader.exec_module(make_cocoee)

# image id -> (size, [(annotation id, category, [x, y, w, h], iscrowd)])
FIXTURE = {
    1: ((64, 48), [(11, 1, [4.5, 6.2, 20.0, 16.3], 0), (12, 2, [30, 10, 24, 30], 0)]),
    2: ((50, 50), [(21, 1, [10, 10, 25, 20], 0), (22, 3, [0, 0, 50, 50], 0)]),  # 22: > 80%
    3: ((40, 60), [(31, 2, [5, 20, 20, 25], 0), (32, 1, [0, 0, 3, 3], 0)]),  # 32: < 2%
    4: ((60, 40), [(41, 1, [20, 5, 30, 25], 0), (42, 3, [2, 2, 30, 30], 1)]),  # 42: crowd
    5: ((56, 56), [(51, 2, [8, 8, 30, 30], 0), (52, 3, [30, 30, 20, 20], 0)]),  # 3: one image
    6: ((48, 48), [(61, 1, [12, 12, 24, 24], 0)]),
}
VALID_SOURCE_IMAGES = {1, 2, 3, 4, 5, 6}  # 5 only through its category-2 box


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    coco = {"images": [], "annotations": [], "categories": []}
    for name_id, name in ((1, "cat"), (2, "dog"), (3, "kite")):
        coco["categories"].append({"id": name_id, "name": name})
    rng = np.random.default_rng(0)
    for image_id, ((width, height), image_annotations) in FIXTURE.items():
        # JPEG for one image: the source must be copied byte for byte, not re-encoded.
        file_name = f"{image_id:012d}.{'jpg' if image_id == 1 else 'png'}"
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / file_name)
        coco["images"].append(
            {"id": image_id, "file_name": file_name, "width": width, "height": height}
        )
        for ann_id, category, bbox, crowd in image_annotations:
            coco["annotations"].append(
                {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": bbox}
                | {"iscrowd": crowd, "area": bbox[2] * bbox[3]}
            )
    annotations = tmp_path / "instances_tiny.json"
    annotations.write_text(json.dumps(coco))
    return annotations, images_dir


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_items_follow_the_cocoee_rules(coco, tmp_path):
    annotations, images = coco
    out = tmp_path / "bench"
    manifest = make_cocoee.build_cocoee(annotations, images, out, count=6, seed=3)
    items = manifest["items"]
    assert len(items) == 6 == len(list((out / "mask").iterdir()))
    assert {item["source_image_id"] for item in items} == VALID_SOURCE_IMAGES
    boxes = {ann["id"]: ann for ann in json.loads(annotations.read_text())["annotations"]}
    for item in items:
        source_file = images / item["source_file"]
        assert (out / item["source"]).read_bytes() == source_file.read_bytes()
        mask = np.asarray(Image.open(out / item["mask"]))
        assert mask.shape[::-1] == Image.open(source_file).size
        x0, y0, x1, y1 = item["box"]
        expected = np.zeros_like(mask)
        expected[y0:y1, x0:x1] = 255
        np.testing.assert_array_equal(mask, expected)

        origin = item["reference_from"]
        assert origin["image_id"] != item["source_image_id"]
        reference_ann = boxes[origin["annotation_id"]]
        assert reference_ann["category_id"] == item["category_id"]
        assert not reference_ann["iscrowd"] and origin["annotation_id"] not in (22, 32, 42)
        crop = Image.open(images / origin["file_name"]).convert("RGB").crop(origin["box"])
        np.testing.assert_array_equal(np.asarray(Image.open(out / item["reference"])), crop)
    # COCO's float box [4.5, 6.2, 20, 16.3] is rounded outwards.
    first_image = next(item for item in items if item["source_image_id"] == 1)
    assert first_image["box"] in ([4, 6, 25, 23], [30, 10, 54, 40])


def test_same_seed_same_output_and_too_many_items_refused(coco, tmp_path):
    annotations, images = coco
    make_cocoee.build_cocoee(annotations, images, tmp_path / "a", count=4, seed=1)
    make_cocoee.build_cocoee(annotations, images, tmp_path / "b", count=4, seed=1)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    seeds = [
        make_cocoee.build_cocoee(annotations, images, tmp_path / f"s{seed}", count=4, seed=seed)
        for seed in range(2, 6)
    ]
    assert len({json.dumps(m["items"]) for m in seeds}) > 1
    with pytest.raises(ValueError, match="only 6 items"):
        make_cocoee.build_cocoee(annotations, images, tmp_path / "c", count=7)


def test_command_line_matches_the_function(coco, tmp_path):
    annotations, images = coco
    command = [sys.executable, str(SCRIPT), "--annotations", str(annotations)]
    command += ["--images", str(images), "--out", str(tmp_path / "cli"), "--count", "5"]
    result = subprocess.run([*command, "--seed", "7"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    make_cocoee.build_cocoee(annotations, images, tmp_path / "fn", count=5, seed=7)
    assert folder_bytes(tmp_path / "cli") == folder_bytes(tmp_path / "fn")


def test_area_filter_is_configurable(coco):
    annotations, _ = coco
    coco_json = json.loads(annotations.read_text())
    default = {c.annotation_id for c in make_cocoee.candidates(coco_json)}
    assert default == {11, 12, 21, 31, 41, 51, 52, 61}
    wide = {c.annotation_id for c in make_cocoee.candidates(coco_json, 0.0, 1.0)}
    assert wide == default | {22, 32}  # the crowd box stays out
