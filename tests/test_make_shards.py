"""data/make_shards.py: each source to shards the real loader reads, boxes in displayed pixels."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import ExifTags, Image, ImageOps

from pbe_lightning.data.samples import SampleSpec, make_sample
from pbe_lightning.data.sources import coco_items, folder_items, openimages_items

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "make_shards.py"

# data/ is a scripts folder, not a package: load the script as a module.
_spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
ms = importlib.util.module_from_spec(_spec)
sys.modules["make_shards"] = ms
_spec.loader.exec_module(ms)

PLAIN_BOX = [40, 30, 80, 90]  # in the 160x120 plain image
ROTATED_BOX = [10, 20, 60, 120]  # in the rotated image as displayed: 100 wide, 200 tall
OI_IDS = {
    "plain": "a000000000000001",
    "rotated": "a000000000000002",
    "missing": "a000000000000003",
    "group": "a000000000000004",
    "corrupt": "a000000000000005",
}


def save_image(path: Path, displayed: tuple[int, int], box: list, orientation: int = 1) -> None:
    """A grey image with a red ``box`` where it shows once displayed; stored per orientation."""
    image = Image.new("RGB", displayed, (128, 128, 128))
    image.paste((255, 0, 0), tuple(box))
    exif = Image.Exif()
    if orientation == 6:  # displayed = stored turned 90 deg clockwise
        image = image.transpose(Image.Transpose.ROTATE_90)
        exif[ExifTags.Base.Orientation] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif, quality=95)


def red_box(image: Image.Image) -> list[int]:
    """Where the red rectangle is in the image as displayed."""
    rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB")).astype(int)
    ys, xs = np.nonzero((rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90))
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def make_images(root: Path) -> dict[str, Path]:
    paths = {name: root / f"{name}.jpg" for name in ("plain", "rotated", "corrupt")}
    save_image(paths["plain"], (160, 120), PLAIN_BOX)
    save_image(paths["rotated"], (100, 200), ROTATED_BOX, orientation=6)
    paths["corrupt"].write_bytes(b"not an image at all")
    return paths


def read_shards(out: Path) -> dict[str, dict]:
    """key -> record, over every shard of the manifest, via webdataset's own tar reader."""
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [{"url": str(out / s["file"])} for s in manifest["shards"]]
    return {r["__key__"]: r for r in wds.tarfile_to_samples()(urls)}


def assert_box(record: dict, expected: list, tolerance: float = 0.01) -> None:
    boxes = json.loads(record["json"])["boxes"]
    assert np.allclose(boxes[0], expected, atol=tolerance), (boxes[0], expected)
    image = Image.open(io.BytesIO(record.get("jpg") or record.get("png")))
    # The box must sit on the object in the pixels the loader will see.
    assert np.allclose(red_box(image), expected, atol=2 + tolerance), (red_box(image), expected)


def assert_loader_reads(records: dict[str, dict]) -> None:
    spec = SampleSpec(resolution=64, reference_size=32)
    for record in records.values():
        sample = make_sample(record, spec, random.Random(0))
        assert sample["image"].shape == (3, 64, 64)
        assert sample["reference"].shape == (3, 32, 32)


@pytest.fixture
def openimages(tmp_path: Path) -> list[str]:
    make_images(images := tmp_path / "oi")
    for name in ("plain", "rotated", "corrupt"):
        (images / f"{name}.jpg").rename(images / f"{OI_IDS[name]}.jpg")
    header = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,"
    header += "IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"
    rows = [
        (OI_IDS["plain"], "/m/cat", 0.25, 0.5, 0.25, 0.75, 0),
        (OI_IDS["plain"], "/m/dog", 0.0, 1.0, 0.0, 1.0, 1),
        (OI_IDS["rotated"], "/m/cat", 0.1, 0.6, 0.1, 0.6, 0),
        (OI_IDS["missing"], "/m/cat", 0.1, 0.6, 0.1, 0.6, 0),
        (OI_IDS["group"], "/m/dog", 0.1, 0.6, 0.1, 0.6, 1),
        (OI_IDS["corrupt"], "/m/cat", 0.1, 0.6, 0.1, 0.6, 0),
    ]
    lines = [header] + [
        f"{i},xclick,{m},1,{a},{b},{c},{d},0,0,{g},0,0" for i, m, a, b, c, d, g in rows
    ]
    (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.csv").write_text("/m/cat,Cat\n/m/dog,Dog\n")
    return [
        "openimages",
        *("--boxes", str(tmp_path / "boxes.csv"), "--images", str(images)),
        *("--classes", str(tmp_path / "classes.csv"), "--quiet"),
    ]


@pytest.fixture
def coco(tmp_path: Path) -> list[str]:
    make_images(images := tmp_path / "coco")
    # The same rotated file, annotated by a tool that ignored EXIF: stored size and pixels.
    (images / "rotated_stored.jpg").write_bytes((images / "rotated.jpg").read_bytes())
    x0, y0, x1, y1 = ROTATED_BOX
    stored_box = [y0, 100 - x1, y1 - y0, x1 - x0]  # displayed = stored turned clockwise
    entries = [
        ("plain.jpg", 160, 120, [[40, 30, 40, 60, 0], [0, 0, 10, 10, 1]]),
        ("rotated.jpg", 100, 200, [[10, 20, 50, 100, 0]]),
        ("rotated_stored.jpg", 200, 100, [[*stored_box, 0]]),
        ("missing.jpg", 100, 100, [[10, 10, 50, 50, 0]]),
        ("corrupt.jpg", 100, 100, [[10, 10, 50, 50, 0]]),
        ("empty.jpg", 100, 100, []),
        ("plain.jpg", 50, 50, [[10, 10, 20, 20, 0]]),  # a size the file does not have
    ]
    coco = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "cat"}]}
    for image_id, (file, width, height, anns) in enumerate(entries, 1):
        coco["images"].append({"id": image_id, "file_name": file, "width": width, "height": height})
        for *bbox, crowd in anns:
            coco["annotations"].append(
                {"image_id": image_id, "bbox": bbox, "category_id": 7, "iscrowd": crowd}
            )
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    annotations = str(tmp_path / "instances.json")
    return ["coco", "--annotations", annotations, "--images", str(images), "--quiet"]


@pytest.fixture
def folder(tmp_path: Path) -> list[str]:
    paths = make_images(root := tmp_path / "photos")
    (root / "sub").mkdir()
    paths["plain"].rename(root / "sub" / "a.b.jpg")
    Image.new("RGB", (120, 120)).save(root / "old.bmp")
    save_image(png := tmp_path / "elsewhere" / "p.png", (150, 150), [30, 30, 90, 120])
    lines = [
        {"file": "sub/a.b.jpg", "boxes": [PLAIN_BOX], "labels": ["cat"]},
        {"file": "sub/a.b.jpg", "boxes": [[0, 0, 500, 60]], "labels": ["sky"]},  # clipped
        {"file": "rotated.jpg", "boxes": [ROTATED_BOX]},
        {"file": str(png), "boxes": [[30, 30, 90, 120], [200, 200, 300, 300]]},  # 2nd outside
        {"file": "missing.jpg", "boxes": [[1, 1, 50, 50]]},
        {"file": "corrupt.jpg", "boxes": [[1, 1, 50, 50]]},
        {"file": "old.bmp", "boxes": [[1, 1, 50, 50]]},
    ]
    (root / "boxes.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return ["folder", "--jsonl", str(root / "boxes.jsonl"), "--quiet"]


def run(argv: list[str], out: Path, *extra: str) -> dict:
    assert ms.main([*argv, "--out", str(out), *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_openimages(openimages, tmp_path):
    manifest = run(openimages, tmp_path / "out", "--maxcount", "2", "--drop-group-boxes")
    assert manifest["total_samples"] == 2 and manifest["total_items"] == 5
    assert manifest["skipped"] == {"bad_image": 1, "missing_image": 1, "no_boxes": 1}
    assert manifest["dropped_boxes"] == {"group_of": 2}
    assert [s["samples"] for s in manifest["shards"]] == [2, 0, 0]
    assert manifest["shards_pattern"] == "train-{000000..000002}.tar"
    records = read_shards(tmp_path / "out")
    assert set(records) == {OI_IDS["plain"], OI_IDS["rotated"]}
    assert_box(records[OI_IDS["plain"]], PLAIN_BOX)
    assert_box(records[OI_IDS["rotated"]], ROTATED_BOX)
    meta = json.loads(records[OI_IDS["plain"]]["json"])
    assert meta["labels"] == ["Cat"] and meta["source"] == f"openimages:{OI_IDS['plain']}"
    assert_loader_reads(records)


def test_openimages_keeps_group_boxes_by_default_as_the_paper_trained(openimages, tmp_path):
    manifest = run(openimages, tmp_path / "out")
    assert "group_of" not in manifest["dropped_boxes"]
    # The group-only image has its box, and is skipped for its missing file instead.
    assert manifest["skipped"] == {"bad_image": 1, "missing_image": 2}
    box = json.loads(read_shards(tmp_path / "out")[OI_IDS["plain"]]["json"])["boxes"][1]
    assert box == [0, 0, 160, 120]


def test_coco(coco, tmp_path):
    manifest = run(coco, tmp_path / "out")
    assert manifest["total_samples"] == 3 and manifest["total_items"] == 7
    assert manifest["skipped"] == {
        "bad_image": 1,
        "missing_image": 1,
        "no_boxes": 1,
        "size_mismatch": 1,
    }
    assert manifest["dropped_boxes"] == {"crowd": 1}
    records = read_shards(tmp_path / "out")
    assert set(records) == {"plain", "rotated", "rotated_stored"}
    assert_box(records["plain"], PLAIN_BOX)
    assert_box(records["rotated"], ROTATED_BOX)
    # Annotated on the stored pixels (width/height say so): converted to displayed ones.
    assert_box(records["rotated_stored"], ROTATED_BOX)
    assert json.loads(records["plain"]["json"])["labels"] == ["cat"]
    assert_loader_reads(records)


def test_folder(folder, tmp_path):
    manifest = run(folder, tmp_path / "out")
    assert manifest["total_samples"] == 3 and manifest["total_items"] == 6
    assert manifest["skipped"] == {"bad_image": 1, "missing_image": 1, "unsupported_format": 1}
    assert manifest["dropped_boxes"] == {"empty_or_outside": 1}
    records = read_shards(tmp_path / "out")
    assert "sub_a_b" in records and all("." not in key for key in records)
    meta = json.loads(records["sub_a_b"]["json"])
    assert meta["boxes"] == [PLAIN_BOX, [0, 0, 160, 60]] and meta["labels"] == ["cat", "sky"]
    assert_box(records["sub_a_b"], PLAIN_BOX)
    assert_box(records["rotated"], ROTATED_BOX)
    (png_key,) = [key for key in records if key.endswith("_elsewhere_p")]  # absolute path
    assert "png" in records[png_key]
    assert_box(records[png_key], [30, 30, 90, 120])
    assert_loader_reads(records)


def test_resize_scales_boxes_and_bakes_in_orientation(folder, tmp_path):
    run(folder, tmp_path / "out", "--resize", "80")
    records = read_shards(tmp_path / "out")
    image = Image.open(io.BytesIO(records["rotated"]["jpg"]))
    assert image.size == (40, 80) and image.getexif().get(ExifTags.Base.Orientation, 1) == 1
    assert_box(records["rotated"], [v * 0.4 for v in ROTATED_BOX])
    assert_loader_reads({k: r for k, r in records.items() if k == "rotated"})


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_frame_boxes_follow_every_orientation(orientation):
    stored, box = Image.new("RGB", (40, 24)), (3, 5, 11, 20)
    stored.paste((255, 0, 0), box)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    item = ms.Item("k", "unused", (box,), None, "test", annotated_size=(40, 24))
    header = ms.Header("PNG", (40, 24), orientation)
    (displayed,) = ms.displayed_boxes(item, header, "stored")
    assert list(displayed) == red_box(Image.open(buffer))


def test_rerun_skips_finished_shards_and_rewrites_deleted_ones(coco, tmp_path):
    out = tmp_path / "out"
    first = run(coco, out, "--maxcount", "2")
    shards = [out / s["file"] for s in first["shards"]]
    assert len(shards) == 4
    mtimes = [p.stat().st_mtime_ns for p in shards]
    content = shards[1].read_bytes()
    assert run(coco, out, "--maxcount", "2") == first
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    shards[1].unlink()
    assert run(coco, out, "--maxcount", "2") == first
    assert shards[1].read_bytes() == content  # deterministic bytes
    assert [p.stat().st_mtime_ns for i, p in enumerate(shards) if i != 1] == mtimes[:1] + mtimes[2:]
    # Other settings make other shards: none is reused.
    assert run(coco, out, "--maxcount", "3")["shards_pattern"] == "train-{000000..000002}.tar"


def test_cli_with_two_workers_matches_one(coco, tmp_path):
    one = run(coco, tmp_path / "one", "--maxcount", "2")
    command = [sys.executable, str(SCRIPT), *coco, "--maxcount", "2", "--workers", "2"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert two["shards"] == one["shards"] and two["skipped"] == one["skipped"]
    for shard in one["shards"]:
        name = shard["file"]
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_readers_take_plain_arguments(openimages, coco, folder):
    # The library readers need no command line: paths (str or Path) and keyword options.
    dropped = Counter()
    boxes, images = Path(option(openimages, "--boxes")), option(openimages, "--images")
    classes = option(openimages, "--classes")
    options = {"classes": classes, "keep_group_boxes": False, "dropped": dropped}
    items = list(openimages_items(boxes, images, **options))
    assert [i.key for i in items] == list(OI_IDS.values()) and dropped == {"group_of": 2}
    assert items[0].labels == ("Cat",) and items[0].path == str(Path(images, f"{items[0].key}.jpg"))
    kept = next(openimages_items(boxes, images))  # group boxes kept by default
    assert len(kept.boxes) == 2 and kept.labels == ("/m/cat", "/m/dog")

    dropped = Counter()
    items = list(
        coco_items(option(coco, "--annotations"), option(coco, "--images"), dropped=dropped)
    )
    assert len(items) == 7 and dropped == {"crowd": 1} and items[0].labels == ("cat",)
    assert list(coco_items(option(coco, "--annotations"), option(coco, "--images"))) == items

    jsonl = Path(option(folder, "--jsonl"))
    items = {i.key: i for i in folder_items(jsonl)}
    assert len(items) == 6 and items["sub_a_b"].labels == ("cat", "sky")
    assert items["rotated"].path == str(jsonl.parent / "rotated.jpg")
    assert next(folder_items(jsonl, root="/elsewhere")).path == "/elsewhere/sub/a.b.jpg"


def test_cli_help():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "coco", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--annotations" in done.stdout and "--resize" in done.stdout


def test_maxsize_cuts_shards_by_estimated_bytes(tmp_path):
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(b"x" * 10_000)
    items = [ms.Item(str(i), str(p), ((0, 0, 1, 1),), None, "t") for i, p in enumerate(files)]
    chunks = list(ms.plan_shards(items, maxcount=100, maxsize=25_000))
    assert [len(c) for c in chunks] == [2, 2]


@pytest.mark.parametrize("source", ["openimages", "coco", "folder"])
def test_converted_shards_train(source, request, tmp_path, tiny_cfg):
    from pbe_lightning.train import train

    out = tmp_path / f"shards-{source}"
    manifest = run(request.getfixturevalue(source), out)
    pattern = str(out / manifest["shards_pattern"])
    metrics = train(
        tiny_cfg(f'data.shards="{pattern}"', "trainer.max_steps=2", "data.max_upscale=8")
    )
    assert np.isfinite(metrics["train/loss"])
