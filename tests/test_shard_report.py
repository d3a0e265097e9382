"""``python -m pbe_lightning.data.shard_report``: counts, skips and box statistics of some shards,
and a contact sheet of samples as the model sees them, built from the real config files."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import webdataset as wds
from PIL import Image

from pbe_lightning.data import shard_report
from pbe_lightning.data.datamodule import expand_urls
from pbe_lightning.data.samples import SKIP_REASONS
from pbe_lightning.data.shard_report import load_data_config, main
from pbe_lightning.demo.dataset import demo_shard_pattern, ensure_demo_dataset
from pbe_lightning.images import LABEL_HEIGHT
from tests.helpers.config import CONF
from tests.helpers.hostile_corpus import write_hostile_corpus

SMALL = ["--resolution", "64", "--reference-size", "32"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 records in shards of 16, 16 and 8."""
    root = ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "d", samples=40, per_shard=16)
    return demo_shard_pattern(root, 3)


def box_count(pattern: str) -> int:
    records = wds.tarfile_samples([{"url": u} for u in expand_urls(pattern)])
    return sum(len(json.loads(r["json"])["boxes"]) for r in records)


def test_counts_boxes_and_contact_sheet_of_demo_shards(demo, tmp_path, capsys):
    out = tmp_path / "sheet" / "contact.png"
    stats = main([demo, "--samples", "5", "--out", str(out), "--tile", "64", *SMALL])
    report = capsys.readouterr().out
    assert re.findall(r"train-00000\d\.tar\s+(\d+) records", report) == ["16", "16", "8"]
    assert "records: 40 total, 40 usable, 0 skipped" in report
    for reason in SKIP_REASONS:
        assert re.search(rf"^  {reason}\s+0$", report, re.M), reason
    boxes = box_count(demo)
    assert f"boxes: {boxes} in 40 images" in report
    assert re.search(r"area fraction\s+min [\d.e-]+\s+p10 .*median .*max", report)
    assert re.search(r"aspect \(w/h\)\s+min", report)
    assert re.search(r"images \(readable headers\): 40; formats: JPEG 40; EXIF-rotated: 0", report)
    assert "width   min 128" in report  # the demo's 128 px scenes
    assert stats.accepted == boxes  # demo boxes are drawn between 5% and 30% of the image
    # Five rows of four 64 px panels, 2 px apart: make_grid's layout.
    assert Image.open(out).size == (4 * 66 + 2, LABEL_HEIGHT + 5 * 66 + 2)  # + column names
    assert "contact sheet:" in report and "mask=paper, augment=paper" in report


def test_skip_counts_are_the_ones_training_would_log(tmp_path, capsys):
    corpus = write_hostile_corpus(tmp_path / "hostile")
    stats = main([*map(str, corpus.shards), "--out", "", *SMALL])
    expected = corpus.expected
    assert stats.usable == expected.samples
    assert stats.records == expected.records
    assert {r: n for r, n in stats.skips.items() if n} == dict(expected.skips)
    report = capsys.readouterr().out
    for reason in SKIP_REASONS:
        assert re.search(rf"^  {reason}\s+{expected.skips[reason]}$", report, re.M), reason
    assert "contact sheet" not in report


def test_max_records_stops_early_and_the_device_decode_view_draws_too(demo, tmp_path, capsys):
    out = tmp_path / "contact.png"
    args = [demo, "--max-records", "20", "--samples", "3", "--out", str(out), "--tile", "32"]
    stats = main([*args, "--mask", "box", "--augment", "none", "--decode-on-device", *SMALL])
    assert list(stats.records_per_shard.values()) == [16, 4]
    assert "records: 20 total, 20 usable" in capsys.readouterr().out
    assert Image.open(out).size == (4 * 34 + 2, LABEL_HEIGHT + 3 * 34 + 2)


def test_mask_and_augment_choices_come_from_the_config_files():
    cfg = load_data_config("box", "none")
    assert cfg.mask.irregular_prob == 0.0
    assert cfg.augment.hflip == cfg.augment.rotation == cfg.augment.elastic == 0.0
    strong = load_data_config("irregular", "strong", ["data.box_filter.min_area=0.05"])
    assert strong.mask.irregular_prob == 1.0 and strong.augment.perspective > 0
    assert strong.box_filter.min_area == 0.05


def test_a_pattern_matching_nothing_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no shards"):
        main([str(tmp_path / "none-*.tar"), "--out", ""])


def test_the_config_tree_is_found_without_a_checkout(demo, tmp_path, monkeypatch, capsys):
    # As installed: no conf/ next to the package, run from a folder without one either.
    monkeypatch.setattr(shard_report, "CHECKOUT_CONF", tmp_path / "site-packages" / "conf")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--config-dir") as refused:
        main([demo, "--out", "", *SMALL])
    assert "\n" not in str(refused.value)  # one line, not a Hydra traceback
    tree = shutil.copytree(CONF, tmp_path / "elsewhere" / "conf")
    stats = main([demo, "--out", "", "--config-dir", str(tree), *SMALL])
    assert stats.records == 40 and "records: 40 total" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--config-dir"):
        main([demo, "--out", "", "--config-dir", str(tmp_path), *SMALL])  # not a config tree
    # ./conf in the current directory is the default, and comes before the checkout's.
    (tree / "data" / "mask" / "box.yaml").write_text(
        "defaults:\n  - paper\n  - _self_\nirregular_prob: 0.25\n"
    )
    monkeypatch.chdir(tree.parent)
    assert load_data_config("box", "none").mask.irregular_prob == 0.25
    monkeypatch.setattr(shard_report, "CHECKOUT_CONF", CONF)
    assert load_data_config("box", "none").mask.irregular_prob == 0.25
    assert load_data_config("box", "none", config_dir=CONF).mask.irregular_prob == 0.0
