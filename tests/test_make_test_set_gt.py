"""data/make_test_set_gt.py: COCO test images -> test_set_GT (shorter side to the size, centre
crop), pixel for pixel as the public script's torchvision transform made them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "make_test_set_gt.py"

spec = importlib.util.spec_from_file_location("make_test_set_gt", SCRIPT)
make_test_set_gt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_test_set_gt)

# name -> (width, height, mode, the resized size by hand, the crop's left/top by hand) at size 64:
# the longer side is int(64 * long / short); the offset round((side - 64) / 2), half to even.
CASES = {
    "landscape": (99, 80, "RGB", (79, 64), (8, 0)),  # 79 = int(79.2); (79 - 64) / 2 = 7.5 -> 8
    "portrait": (80, 97, "L", (64, 77), (0, 6)),  # 77 = int(77.6); 6.5 -> 6 (half to even)
    "square": (64, 64, "RGB", (64, 64), (0, 0)),
    "cmyk": (70, 128, "CMYK", (64, 117), (0, 26)),  # 117 = int(117.03); 26.5 -> 26
}


def write_inputs(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (width, height, mode, _, _) in CASES.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"{name}.jpg", quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image")


def expected(source: Path, resized: tuple[int, int], corner: tuple[int, int]) -> np.ndarray:
    """PIL's bilinear resize to the hand-computed size, then the hand-computed 64x64 window."""
    with Image.open(source) as image:
        image = image if image.mode in ("RGB", "L") else image.convert("RGB")
        square = image.resize(resized, Image.Resampling.BILINEAR)
    left, top = corner
    return np.asarray(square.crop((left, top, left + 64, top + 64)))


def torchvisions(source: Path) -> np.ndarray:
    """What the public script's own transform makes of it (torchvision on the PIL image)."""
    from torchvision.transforms import CenterCrop, Compose, Resize

    with Image.open(source) as image:
        image = image if image.mode in ("RGB", "L") else image.convert("RGB")
        return np.asarray(Compose([Resize(64), CenterCrop(64)])(image))


def test_images_are_squared_like_the_public_script_and_reruns_resume(tmp_path):
    images, out = tmp_path / "test2017", tmp_path / "test_set_GT"
    write_inputs(images)
    summary = make_test_set_gt.build_test_set_gt(images, out, size=64)
    assert summary["written"] == len(CASES) and list(summary["unreadable"]) == ["broken.jpg"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.png" for name in CASES)
    for name, (_, _, mode, resized, corner) in CASES.items():
        with Image.open(out / f"{name}.png") as written:
            assert written.size == (64, 64)
            assert written.mode == ("L" if mode == "L" else "RGB")  # grey stays grey
            pixels = np.asarray(written)
        np.testing.assert_array_equal(pixels, expected(images / f"{name}.jpg", resized, corner))
        np.testing.assert_array_equal(pixels, torchvisions(images / f"{name}.jpg"))

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "square.png").unlink()  # as if interrupted before it
    again = make_test_set_gt.build_test_set_gt(images, out, size=64)
    assert (again["written"], again["kept"]) == (1, len(CASES) - 1)
    assert all(
        (out / name).stat().st_mtime_ns == stamp
        for name, stamp in stamps.items()
        if name != "square.png"
    )
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_the_command_runs_with_workers_and_reports(tmp_path):
    images, out = tmp_path / "test2017", tmp_path / "test_set_GT"
    write_inputs(images)
    command = [sys.executable, str(SCRIPT), "--images", str(images), "--out", str(out)]
    result = subprocess.run(
        command + ["--workers", "2"], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{out}: {len(CASES)} written, 0 already there, 1 unreadable skipped" in result.stdout
    assert "skipped broken.jpg:" in result.stdout
    with Image.open(out / "landscape.png") as square:
        assert square.size == (512, 512)  # the default size: the paper's
    missing = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", str(tmp_path / "nope"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("make_test_set_gt: --images")
