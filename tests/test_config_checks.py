"""Config values that cannot work end in one line naming the key and the fix, before the model
(or the data) is built."""

from __future__ import annotations

import pytest

import pbe_lightning.train as train_module
from pbe_lightning.train import train
from pbe_lightning.utils import config_checks
from pbe_lightning.utils.config_checks import ConfigError, check_config
from tests.helpers.processes import run_train

BAD = [
    (["model.optimizer.lr=-1e-3"], r"model\.optimizer\.lr=-0\.001 must be a positive number: "),
    (["data.batch_size=0"], r"data\.batch_size=0 must be a whole number >= 1: samples per GPU"),
    (["data.num_workers=-1"], r"data\.num_workers=-1 must be a whole number >= 0 "),
    (["trainer.max_steps=0"], r"trainer\.max_steps=0 must be a whole number >= 1 \(or -1"),
    (["model.cfg_dropout=1.5"], r"model\.cfg_dropout=1\.5 must be a probability in \[0, 1\]: "),
    (["model.sampler=euler"], r"model\.sampler=euler must be one of ddim, dpm, pndm: "),
    (["model.sample_steps=0"], r"model\.sample_steps=0 must be a whole number >= 1: "),
    (["model.lr_scheduler.warmup_steps=-5"], r"model\.lr_scheduler\.warmup_steps=-5 must be "),
    (["data.resolution=0"], r"data\.resolution=0 must be a whole number >= 1: pixels"),
    (["data.sampling=shuffled"], r"data\.sampling=shuffled must be resampled or epochs: "),
    (["trainer.log_every_n_steps=0"], r"trainer\.log_every_n_steps=0 must be a whole number"),
    (["trainer.accumulate_grad_batches=0"], r"trainer\.accumulate_grad_batches=0 must be "),
    (["trainer.precision=fp16"], r"trainer\.precision=fp16 must be one of .*bf16-mixed.*: e\.g\."),
    (["trainer.gradient_clip_val=-1"], r"trainer\.gradient_clip_val=-1 must be a number >= 0 "),
    (
        ["callbacks=ema", "callbacks.ema.decay=1.0"],
        r"callbacks\.ema\.decay=1\.0 must be in \(0, 1\)",
    ),
]


@pytest.fixture
def no_model_build(monkeypatch):
    """Any check that lets the config through to the model fails the test at once."""

    def refuse(cfg):
        raise AssertionError("build_model was reached: the config was not checked first")

    monkeypatch.setattr(train_module, "build_model", refuse)


def expect_config_error(cfg, pattern: str) -> str:
    with pytest.raises(ConfigError, match=pattern) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("overrides", "pattern"), BAD, ids=[b[0][-1] for b in BAD])
def test_a_bad_value_names_its_key_and_fix_before_the_model_loads(
    tiny_cfg, tmp_path, no_model_build, overrides, pattern
):
    message = expect_config_error(tiny_cfg(*overrides), "^" + pattern)
    assert "e.g." in message  # every message shows a value that works
    assert not (tmp_path / "run").exists()  # nothing was written either


def test_trainer_gpu_without_a_gpu_says_use_trainer_cpu(tiny_cfg, no_model_build, monkeypatch):
    monkeypatch.setattr(config_checks, "visible_gpus", lambda: 0)
    expect_config_error(
        tiny_cfg("trainer=gpu"),
        r"^trainer\.accelerator=gpu but this machine has no GPU .*trainer=cpu",
    )
    monkeypatch.setattr(config_checks, "visible_gpus", lambda: 1)
    expect_config_error(
        tiny_cfg("trainer=gpu", "trainer.devices=2"),
        r"^trainer\.devices=2 but this machine has 1 GPU\(s\): use trainer\.devices=1",
    )


def test_ema_under_fsdp_is_refused_up_front(tiny_cfg, no_model_build, monkeypatch):
    monkeypatch.setattr(config_checks, "visible_gpus", lambda: 8)
    expect_config_error(
        tiny_cfg("trainer=fsdp", "callbacks=ema"), r"^callbacks=ema does not support trainer=fsdp"
    )


@pytest.mark.parametrize("experiment", ["demo", "paper", "finetune"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp", "multinode"])
def test_every_shipped_recipe_passes_the_checks(
    tiny_cfg, tmp_path, monkeypatch, experiment, trainer
):
    monkeypatch.setattr(config_checks, "visible_gpus", lambda: 8)
    (tmp_path / "b32.bin").touch()  # the paper's metrics CLIP weights, which the user passes
    given = [f"experiment={experiment}", f"trainer={trainer}"]
    if experiment != "demo":
        given.append(f"metrics_clip.checkpoint={tmp_path / 'b32.bin'}")
    check_config(tiny_cfg(*given))
    if trainer != "fsdp":
        check_config(tiny_cfg(*given, "callbacks=ema"))


def test_the_paper_metrics_need_their_clip_weights_before_anything_loads(
    tiny_cfg, tmp_path, no_model_build
):
    expect_config_error(
        tiny_cfg("experiment=paper"),
        r"^metrics_clip\.checkpoint is required by callbacks\.edit_metrics: .*every_n_validations=0",
    )
    expect_config_error(
        tiny_cfg("experiment=paper", f"metrics_clip.checkpoint={tmp_path}/nope.bin"),
        r"^metrics_clip\.checkpoint=.*nope\.bin: no such file",
    )


def test_the_command_line_prints_one_line_and_exits_1(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = ["debug=tiny", "data.batch_size=0", f"hydra.run.dir={run_dir}"]
    result = run_train(args, cwd=tmp_path, cache=cache_dir, timeout=120)
    assert result.returncode == 1
    assert result.stdout.strip() == ""
    assert result.stderr.strip().splitlines() == [
        "error: data.batch_size=0 must be a whole number >= 1: samples per GPU, "
        "e.g. data.batch_size=4"
    ]


def test_an_ablation_without_multirun_is_refused_on_the_command_line(tmp_path, cache_dir):
    args = ["ablation=mask", "debug=tiny", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_train(args, cwd=tmp_path, cache=cache_dir, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: ablation=mask is a sweep grid, and this is a single run: put -m first "
        "(python train.py -m ablation=mask ...), or drop ablation= for one run"
    ]
