"""Checkpoints that cannot run code: a tampered file is refused by every entry point, in one
line naming the file and the type it holds, before anything in it runs; the user's trust lets a
file through; everything train.py writes loads with ``torch.load(weights_only=True)``.

The payload creates a marker file when unpickled (``tests/helpers/payloads.py``): the marker's
absence is the proof that nothing ran. ``test_the_payload_runs_when_trusted`` shows it would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, IterableDataset

from pbe_lightning.checkpoints import newest_readable
from pbe_lightning.demo.tiny_models import tiny_clip_folder
from pbe_lightning.export import export_official
from pbe_lightning.models.backbone import load_backbone
from pbe_lightning.models.build import load_trained
from pbe_lightning.models.encoder import load_clip_vision
from pbe_lightning.models.optimizers import ADAMW_8BIT
from pbe_lightning.safe_load import (
    UnsafeCheckpoint,
    check_loadable,
    load_checkpoint,
    trusted_files,
)
from pbe_lightning.stops import DataBroken, RunStopped, stop_lines, stops_as_errors
from tests.helpers.config import REPO, TINY
from tests.helpers.hostile_corpus import TouchOnUnpickle
from tests.helpers.payloads import with_omegaconf, with_payload
from tests.helpers.processes import run_train

REFUSED = r"refused to load .*: it holds a pickled getattr, and loading it would run code"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload-ran"


@pytest.fixture
def payload(tiny_checkpoint: Path, tmp_path: Path, marker: Path) -> Path:
    return with_payload(tiny_checkpoint, tmp_path / "tampered" / "last.ckpt", marker)


# -- in-process: the shared loader ---------------------------------------------------------
def test_a_payload_is_refused_in_one_line_naming_the_file_and_type(payload, marker):
    with pytest.raises(UnsafeCheckpoint, match=REFUSED) as info:
        load_checkpoint(payload)
    message = str(info.value)
    assert "\n" not in message and str(payload) in message
    assert "trust_checkpoint=true" in message and "--trust-checkpoint" in message
    with pytest.raises(UnsafeCheckpoint):
        check_loadable(payload)  # the cheap memory-mapped check, for files libraries read
    assert not marker.exists()


def test_the_payload_runs_when_trusted(payload, marker):
    # The opt-in means what it says: the file's code runs (this is why it is opt-in).
    with trusted_files(payload.parent):  # a folder: every checkpoint in it (ckpt_path=last)
        load_checkpoint(payload)
    assert marker.exists()
    with pytest.raises(UnsafeCheckpoint):  # the trust ended with the block
        load_checkpoint(payload)


def test_ckpt_path_last_refuses_a_tampered_last_ckpt_rather_than_skipping_it(
    payload, marker, tiny_checkpoint
):
    folder = payload.parent
    (folder / "step_0000001.ckpt").write_bytes(tiny_checkpoint.read_bytes())  # an older one
    with pytest.raises(UnsafeCheckpoint, match=REFUSED):
        newest_readable(folder)
    assert not marker.exists()


def test_a_stored_config_that_would_call_something_else_is_refused(
    tiny_checkpoint, tmp_path, marker
):
    # Tensors and plain values only, yet Hydra would call what its model config names.
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["pbe_model_config"]["backbone"] = {"_target_": "os.makedirs", "name": str(marker)}
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(UnsafeCheckpoint, match=r"model\.backbone\._target_='os\.makedirs'"):
        load_trained(str(tmp_path / "odd.ckpt"))
    assert not marker.exists()


def test_a_checkpoint_trained_with_our_8bit_optimiser_loads(tiny_checkpoint, tmp_path):
    """memory=24gb names ``models.optimizers.adamw_8bit``: ours, so not a tampered config."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["pbe_model_config"]["optimizer"]["_target_"] = ADAMW_8BIT
    torch.save(checkpoint, tmp_path / "compact.ckpt")
    assert load_trained(str(tmp_path / "compact.ckpt")) is not None


def test_frozen_weight_files_holding_code_are_refused(cache_dir, tmp_path, marker):
    # The CLIP tower's open_clip .bin (open_clip reads it after our check) and an SD .ckpt.
    clip = tmp_path / "clip"
    clip.mkdir()
    source = tiny_clip_folder(cache_dir)
    (clip / "open_clip_config.json").write_bytes((source / "open_clip_config.json").read_bytes())
    tensors = load_file(source / "open_clip_model.safetensors")
    torch.save({**tensors, "x": TouchOnUnpickle(marker)}, clip / "open_clip_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match=r"open_clip_pytorch_model\.bin: .*re-save its"):
        load_clip_vision(f"local-dir:{clip}", None)
    torch.save({"state_dict": {"x": TouchOnUnpickle(marker)}}, tmp_path / "sd.ckpt")
    with pytest.raises(UnsafeCheckpoint, match=r"sd\.ckpt: it holds a pickled getattr"):
        load_backbone(str(tmp_path / "sd.ckpt"))
    assert not marker.exists()


def test_trainers_own_checkpoint_loads_weights_only(tiny_checkpoint):
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert {"state_dict", "pbe_model_config", "pbe_architecture", "callbacks"} <= set(checkpoint)
    assert load_trained(str(tiny_checkpoint)).training_resolution == 64


# -- decided stops -------------------------------------------------------------------------
class BrokenStream(IterableDataset):
    def __iter__(self):
        raise DataBroken("the last 3 shards read were all corrupt: check data.shards")


def test_a_stop_raised_in_a_loader_worker_keeps_its_message():
    loader = DataLoader(BrokenStream(), batch_size=None, num_workers=1)
    with pytest.raises(DataBroken) as info:
        next(iter(loader))
    assert str(info.value) == "the last 3 shards read were all corrupt: check data.shards"


def test_rank_zero_prints_a_stop_and_other_ranks_only_their_own_data(monkeypatch):
    shared, own = RunStopped("lr too high: lower it"), DataBroken("shards broken: fix them")
    assert stop_lines(shared, 0) == "error: lr too high: lower it"
    assert stop_lines(shared, 3) is None  # rank zero says it
    assert stop_lines(own, 3) == "error: [rank 3] shards broken: fix them"
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as info, stops_as_errors():
        raise RunStopped("a\nb")
    assert info.value.code == "error: a\nerror: b"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the traceback, for whoever debugs it
    with pytest.raises(RunStopped), stops_as_errors():
        raise RunStopped("a")


# -- every entry point, as a user runs it ---------------------------------------------------
def run_module(
    module: str, args: list[str], cwd: Path, cache: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PBE_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    command = [sys.executable, *([module] if module.endswith(".py") else ["-m", module]), *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_refused(result: subprocess.CompletedProcess, marker: Path, held: str = "getattr"):
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = errors(result)  # one line
    assert line.startswith("error: refused to load ") and f"holds a pickled {held}" in line, line
    assert not marker.exists()


@pytest.fixture
def photo_files(tmp_path: Path) -> dict[str, Path]:
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(tmp_path / "example.png")
    return {k: tmp_path / f"{k}.png" for k in ("photo", "mask", "example")}


@pytest.mark.slow
def test_every_entry_point_refuses_a_tampered_checkpoint(
    payload, marker, tmp_path, cache_dir, photo_files
):
    run = [*TINY, f"hydra.run.dir={tmp_path / 'run'}"]
    assert_refused(
        run_train([*run, f"ckpt_path={payload}"], tmp_path, cache_dir, timeout=900), marker
    )
    resumed = [*TINY, f"hydra.run.dir={payload.parent.parent}", "ckpt_path=last"]
    payload.parent.rename(payload.parent.parent / "checkpoints")  # the run folder's last.ckpt
    payload = payload.parent.parent / "checkpoints" / "last.ckpt"
    assert_refused(run_train(resumed, tmp_path, cache_dir, timeout=900), marker)

    folders = [tmp_path / "benchmark", tmp_path / "real"]
    for folder in folders:
        folder.mkdir()
    evaluate = [f"ckpt_path={payload}", f"benchmark={folders[0]}", f"real_images={folders[1]}"]
    evaluate += [f"clip.arch=local-dir:{cache_dir}/tiny/clip", f"hydra.run.dir={tmp_path}/eval"]
    assert_refused(
        run_module(str(REPO / "evaluate.py"), evaluate, tmp_path, cache_dir, timeout=900), marker
    )

    edit = ["--ckpt", str(payload), "--out", str(tmp_path / "edited.png")]
    edit += ["--image", str(photo_files["photo"]), "--mask", str(photo_files["mask"])]
    edit += ["--example", str(photo_files["example"]), "--steps", "2"]
    assert_refused(run_module("pbe_lightning.edit", edit, tmp_path, cache_dir, timeout=900), marker)

    for extra in ([], ["--ema"], ["--format", "official"]):
        out = tmp_path / ("out.safetensors" if extra[:1] == ["--format"] else "out")
        export = ["--ckpt", str(payload), "--out", str(out), *extra]
        assert_refused(
            run_module("pbe_lightning.export", export, tmp_path, cache_dir, timeout=900), marker
        )
        assert not out.exists()


@pytest.mark.slow
def test_finetune_refuses_tampered_init_weights(tiny_checkpoint, tmp_path, cache_dir, marker):
    official = export_official(load_trained(str(tiny_checkpoint)), tmp_path / "pbe.ckpt")
    tampered = with_payload(official, tmp_path / "tampered.ckpt", marker)
    args = ["experiment=finetune", f"model.init_from={tampered}", "model/encoder=tiny"]
    args += ["model/backbone=tiny", "~model.backbone.path", "data=demo", "trainer=cpu"]
    args += ["data.resolution=64", "data.reference_size=64", *TINY]
    args += ["metrics_clip.arch=local-dir:${paths.cache_dir}/tiny/clip"]
    result = run_train(
        [*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, cache_dir, timeout=900
    )
    assert_refused(result, marker)
    assert "model.init_from" in errors(result)[0]


@pytest.mark.slow
def test_the_trust_opt_in_lets_a_trusted_non_plain_file_through(
    tiny_checkpoint, tmp_path, cache_dir
):
    hparams = with_omegaconf(tiny_checkpoint, tmp_path / "hparams.ckpt")
    no_marker = tmp_path / "none"
    export = ["--ckpt", str(hparams), "--out", str(tmp_path / "pipe")]
    refused = run_module("pbe_lightning.export", export, tmp_path, cache_dir, timeout=900)
    assert_refused(refused, no_marker, held="omegaconf.dictconfig.DictConfig")
    trusted = run_module(
        "pbe_lightning.export", [*export, "--trust-checkpoint"], tmp_path, cache_dir
    )
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert (tmp_path / "pipe" / "model_index.json").is_file()

    run = [*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={hparams}"]
    assert_refused(run_train(run, tmp_path, cache_dir, timeout=900), no_marker, held="omegaconf")
    resumed = run_train([*run, "trust_checkpoint=true"], tmp_path, cache_dir, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # resumed at step 1, trained on to debug=tiny's 4


# -- what train.py writes ------------------------------------------------------------------
@pytest.mark.slow
def test_every_kind_of_checkpoint_train_writes_loads_weights_only(
    tmp_path, cache_dir, small_shards
):
    """Periodic and last, saved on a signal, with EMA, loader-stream states (2 workers) and
    W&B artifacts: all of them load with ``torch.load(weights_only=True)``."""
    run_dir, staging = tmp_path / "run", tmp_path / "wandb-data"
    args = [*TINY, *small_shards, "callbacks=ema", "data.num_workers=2", "trainer.max_steps=8"]
    args += ["logger=wandb", "logger.wandb.offline=true", "logger.wandb.log_model=all"]
    args += ["+callbacks.stop._target_=tests.helpers.callbacks.SignalAt"]
    args += ["+callbacks.stop.step=4", "+callbacks.stop.signal=SIGTERM"]
    result = run_train(
        [*args, f"hydra.run.dir={run_dir}"], tmp_path, cache_dir, 900, WANDB_DATA_DIR=str(staging)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    staged = sorted(p for p in staging.rglob("*") if p.is_file() and p.stat().st_size > 100_000)
    assert [p.name for p in written] == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    assert len(staged) == 2  # the W&B artifacts' staged copies of steps 2 and 4
    for path in written + staged:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert "pbe_ema" in checkpoint and "pbe_model_config" in checkpoint, path
    last = torch.load(written[0], map_location="cpu", weights_only=True)
    assert last["global_step"] == 5  # saved on SIGTERM, after the step in flight
    assert "SIGTERM: saved" in result.stderr + result.stdout
    assert OmegaConf.create(last["pbe_model_config"]).backbone._target_.endswith("tiny_backbone")
