"""End to end through train(cfg) and train.py, as a user runs them."""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import pbe_lightning.train as train_module
from pbe_lightning.models.build import build_model
from pbe_lightning.train import train
from pbe_lightning.utils.config_checks import ConfigError
from tests.helpers.config import TINY
from tests.helpers.processes import run_train


def test_resume_restores_global_step_and_optimizer_state(monkeypatch, tiny_cfg, tmp_path):
    first = tiny_cfg()
    train(first)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4
    # Frozen weights are reloaded from the weight files, not stored in every checkpoint.
    assert not any(k.startswith(("vae.", "encoder.vision.")) for k in saved["state_dict"])
    assert saved["pbe_model_config"]["cfg_dropout"] == 0.2
    assert saved["pbe_resolution"] == 64  # inference paints at the training resolution

    restored = {}

    def spy(cfg):
        restored["model"] = build_model(cfg)
        return restored["model"]

    resumed = tiny_cfg(f"ckpt_path={last}", "trainer.max_steps=4")
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "build_model", spy)
        train(resumed)
    trainer = restored["model"].trainer
    assert trainer.global_step == 4  # nothing left to do: the step came from the checkpoint
    state = trainer.optimizers[0].state_dict()["state"]
    saved_state = saved["optimizer_states"][0]["state"]
    assert state.keys() == saved_state.keys()
    for index in saved_state:
        assert torch.equal(state[index]["exp_avg"], saved_state[index]["exp_avg"])
        assert float(state[index]["step"]) == 4
    model_state = restored["model"].state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in saved["state_dict"].items())

    continued = tiny_cfg(f"ckpt_path={last}", "trainer.max_steps=6")
    train(continued)
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == 6
    first_param = next(iter(final["optimizer_states"][0]["state"].values()))
    assert float(first_param["step"]) == 6


def write_shards(folder, count=12, per_shard=6, size=(160, 120)):
    """A user's own data in the shard contract: JPEG + json boxes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard in range(count // per_shard):
        with wds.TarWriter(str(folder / f"mine-{shard:03d}.tar")) as sink:
            for i in range(per_shard):
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                pixels[30:90, 40:110] = rng.integers(0, 255, 3)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG")
                sample = {
                    "boxes": [[40, 30, 110, 90]],
                    "labels": ["thing"],
                    "source": "test",
                    "extra": 1,
                }
                sink.write({"__key__": f"s{shard}_{i}", "jpg": buffer.getvalue(), "json": sample})
    return folder


@pytest.mark.parametrize("form", ["brace", "list"])
def test_trains_on_a_users_own_shards(tiny_cfg, tmp_path, form):
    folder = write_shards(tmp_path / "shards")
    shards = (
        f"data.shards={folder}/mine-{{000..001}}.tar"
        if form == "brace"
        else f"data.shards=[{folder}/mine-000.tar,{folder}/mine-001.tar]"
    )
    from pbe_lightning.utils.overrides import quote_brace_patterns

    metrics = train(tiny_cfg(*quote_brace_patterns([shards])))
    assert np.isfinite(metrics["train/loss"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_missing_shards_fail_before_any_weights_load(tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"data.shards={tmp_path}/nope-000.tar")
    with pytest.raises(ConfigError, match="data.shards") as info:
        train(cfg)
    assert "nope-000.tar" in str(info.value)


def test_paper_recipe_without_weights_names_the_override(tiny_cfg, tmp_path):
    shards = write_shards(tmp_path / "shards")
    clip = tmp_path / "b32.bin"  # the metrics' CLIP (checked first, by config_checks)
    clip.touch()
    cfg = tiny_cfg(
        "experiment=paper",
        f"metrics_clip.checkpoint={clip}",
        f"data.shards={shards}/mine-000.tar",
        "trainer.devices=1",
        "trainer.strategy=auto",
        "trainer.accelerator=cpu",
    )
    with pytest.raises(ConfigError, match="model.backbone.path"):
        train(cfg)
    cfg = tiny_cfg(
        "experiment=paper",
        f"metrics_clip.checkpoint={clip}",
        f"data.shards={shards}/mine-000.tar",
        "model/backbone=tiny",
    )
    with pytest.raises(ConfigError, match="model.encoder.checkpoint"):
        train(cfg)
    cfg = tiny_cfg("experiment=paper", f"metrics_clip.checkpoint={clip}")
    with pytest.raises(ValueError, match="data.shards is not set"):
        train(cfg)


@pytest.mark.slow
def test_default_demo_shortened_writes_checkpoint_samples_and_wandb_run(tmp_path, cache_dir):
    run_dir = tmp_path / "demo"
    args = [
        "trainer.max_steps=6",
        "data.batches_per_epoch=3",
        "callbacks.checkpoint.every_n_train_steps=3",
        "model.sample_steps=2",
        "data.val_samples=4",
        "trainer.log_every_n_steps=2",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_train(args, cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000003.png", "step_0000006.png"]
    with Image.open(grids[-1]) as grid:
        assert grid.width > 4 * 64 and grid.height >= 4 * 64
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("files/media/images/val/samples_*.png"))
    assert "resolution: 64" in (run_dir / "config_resolved.yaml").read_text()
    metrics = next((run_dir / "csv").glob("*/metrics.csv")).read_text().splitlines()
    assert "train/loss" in metrics[0].split(",") and len(metrics) > 2


@pytest.mark.slow
def test_two_process_cpu_ddp_gets_equal_batches_and_one_output_dir(tmp_path, cache_dir):
    run_dir = tmp_path / "outputs" / "ddp"
    args = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        *TINY,
        "logger=csv",
        "trainer.max_steps=5",
        "data.batches_per_epoch=3",
        "+callbacks.batch_counter._target_=tests.helpers.callbacks.BatchCounter",
        f"+callbacks.batch_counter.dirpath={run_dir}/counts",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_train(args, cwd=tmp_path, cache=cache_dir, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [
        json.loads((run_dir / "counts" / f"batches_rank{r}.json").read_text()) for r in (0, 1)
    ]
    assert [c["world_size"] for c in counts] == [2, 2]
    assert counts[0]["batches"] == counts[1]["batches"] == 5
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == [
        "ddp"
    ]  # rank 1 made no dir of its own
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_bf16_mixed_with_accumulation_and_clipping_trains(tiny_cfg):
    cfg = tiny_cfg(
        "trainer.precision=bf16-mixed",
        "trainer.accumulate_grad_batches=2",
        "trainer.gradient_clip_val=1.0",
    )
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    checkpoint = torch.load(
        cfg.paths.output_dir + "/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["global_step"] == 4  # optimiser steps: 8 batches accumulated in pairs


def test_a_resolution_the_model_cannot_use_names_the_fix(tiny_cfg):
    with pytest.raises(
        ValueError, match=r"data.resolution=60 is not a multiple of 16.*data.resolution=48"
    ):
        train(tiny_cfg("data.resolution=60"))
