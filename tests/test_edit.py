"""``python -m pbe_lightning.edit``: any photo size, square region, paste-back, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from pbe_lightning.demo.dataset import demo_scene
from pbe_lightning.edit import main
from pbe_lightning.images import read_image, read_user_mask
from pbe_lightning.inference import edit_photo, edit_region, load_editor
from tests.helpers.config import REPO

WIDTH, HEIGHT = 200, 150
BOX = (120, 40, 170, 90)  # x0, y0, x1, y1 of the white (edit) rectangle


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edit")
    scene = demo_scene(np.random.default_rng(5), 160)[0].resize((WIDTH, HEIGHT))
    scene.save(root / "photo.png")
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(np.zeros_like(mask)).save(root / "empty.png")
    Image.fromarray(mask[:100]).save(root / "small.png")
    demo_scene(np.random.default_rng(6), 48)[0].crop((4, 4, 40, 30)).save(root / "example.png")
    return {"root": root, "ckpt": tiny_checkpoint} | {
        name: root / f"{name}.png" for name in ("photo", "mask", "empty", "small", "example")
    }


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_command_pastes_back_only_the_masked_pixels(files):
    out = files["root"] / "edited.png"
    command = [sys.executable, "-m", "pbe_lightning.edit", "--ckpt", str(files["ckpt"])]
    for flag in ("image", "mask", "example"):
        command += [f"--{flag}", str(files["photo" if flag == "image" else flag])]
    command += ["--out", str(out), "--steps", "2", "--paste-back"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert Image.open(out).size == (WIDTH, HEIGHT)
    photo, edited = pixels(files["photo"]), pixels(out)
    hole = pixels(files["mask"])[..., 0] > 127
    np.testing.assert_array_equal(edited[~hole], photo[~hole])
    assert np.abs(edited[hole] - photo[hole]).mean() > 1  # the model did paint the hole


@pytest.fixture(scope="module")
def editor(files):
    return load_editor(files["ckpt"], torch.device("cpu"))


def inputs(files) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    photo = read_image(files["photo"])
    return photo, read_user_mask(files["mask"], (WIDTH, HEIGHT)), read_image(files["example"])


def test_region_mode_feathering_and_seed(files, editor):
    module, resolution = editor
    photo, mask, example = inputs(files)
    region = edit_photo(module, resolution, photo, mask, example, steps=2, seed=3)
    side = round(50 * 1.6)  # the 50 px box plus 30% context a side (above the 64 px minimum)
    assert region.shape == (1, 3, side, side)
    again = edit_photo(module, resolution, photo, mask, example, steps=2, seed=3)
    torch.testing.assert_close(region, again, rtol=0, atol=0)
    feathered = edit_photo(
        module, resolution, photo, mask, example, steps=2, paste_back=True, feather=4.0
    )
    keep = mask[0, 0] <= 0.5
    torch.testing.assert_close(feathered[0][:, keep], photo[0][:, keep], rtol=0, atol=0)


def test_region_geometry():
    # A square around the box with context, inside the image, containing the box.
    x0, y0, x1, y1 = edit_region((180, 5, 196, 25), 200, 150, 64, 0.3)
    assert x1 - x0 == y1 - y0 == 64 and 0 <= x0 <= 180 and x1 == 200 and y0 == 0
    assert edit_region((10, 10, 40, 30), 200, 150, 512, 0.3) == (0, 0, 150, 150)  # clipped
    # A box wider than the image is tall fits no square: the whole image is used.
    assert edit_region((0, 20, 190, 60), 200, 150, 64, 0.3) == (0, 0, 200, 150)


def test_photos_are_read_as_displayed(tmp_path):
    # EXIF orientation 6 (rotate 90 degrees): users draw masks on the upright photo.
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.new("RGB", (40, 30), "red").save(tmp_path / "phone.jpg", exif=exif)
    assert read_image(tmp_path / "phone.jpg").shape == (1, 3, 30, 40)
    assert read_image(tmp_path / "phone.jpg", upright=True).shape == (1, 3, 40, 30)


@pytest.mark.parametrize(
    ("mask", "example", "message"),
    [
        ("empty", "example", "no white"),
        ("small", "example", "must have the image's size"),
        ("mask", "missing", r"^error: --example .*missing\.png: no such file$"),
    ],
)
def test_clear_errors(files, mask, example, message):
    argv = ["--ckpt", str(files["ckpt"]), "--image", str(files["photo"])]
    argv += ["--mask", str(files.get(mask, mask)), "--out", str(files["root"] / "x.png")]
    argv += ["--example", str(files.get(example, files["root"] / "missing.png"))]
    with pytest.raises(SystemExit, match=message):
        main(argv)
    assert not (files["root"] / "x.png").exists()


def test_every_argument_mistake_is_listed_at_once(files):
    argv = ["--ckpt", str(files["root"] / "nope.ckpt"), "--image", str(files["photo"])]
    argv += ["--mask", str(files["mask"]), "--example", str(files["root"] / "gone.png")]
    argv += ["--out", str(files["root"] / "x.txt"), "--steps", "0"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert str(info.value).splitlines() == [
        f"error: --ckpt {files['root']}/nope.ckpt: no such file",
        f"error: --example {files['root']}/gone.png: no such file",
        "error: --steps 0 must be a whole number >= 1, e.g. --steps 50",
        f"error: --out {files['root']}/x.txt: name an image file, e.g. edited.png",
    ]


def test_help_shows_the_usage_example_as_written(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    example = (
        "    python -m pbe_lightning.edit --ckpt run/checkpoints/last.ckpt --image photo.jpg \\\n"
    )
    assert example in shown
