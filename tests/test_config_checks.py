"""Config values that cannot work end in one line each naming the key and the fix, all of them
at once, before the model (or the data) is built; evaluate.py's config likewise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pbe_lightning.train as train_module
from pbe_lightning.train import train
from pbe_lightning.utils import config_checks
from pbe_lightning.utils.config_checks import ConfigError, check_config, config_problems
from pbe_lightning.utils.eval_checks import eval_config_problems
from tests.helpers.config import CONF, REPO
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


def user_weights(root) -> dict[str, str]:
    """Files where the paper's recipe wants the user's: SD folder, CLIP files, shards."""
    for part in ("vae", "unet"):
        (root / "sd15" / part).mkdir(parents=True)
        (root / "sd15" / part / "config.json").write_text("{}")
    for name in ("l14.bin", "b32.bin", "pbe.ckpt", "train-000000.tar"):
        (root / name).touch()
    return {
        "model.backbone.path": str(root / "sd15"),
        "model.encoder.checkpoint": str(root / "l14.bin"),
        "metrics_clip.checkpoint": str(root / "b32.bin"),
        "data.shards": str(root / "train-000000.tar"),
        "model.init_from": str(root / "pbe.ckpt"),
    }


@pytest.mark.parametrize("experiment", ["demo", "paper", "finetune"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp", "multinode"])
def test_every_shipped_recipe_passes_the_checks(
    tiny_cfg, tmp_path, monkeypatch, experiment, trainer
):
    monkeypatch.setattr(config_checks, "visible_gpus", lambda: 8)
    given = [f"experiment={experiment}", f"trainer={trainer}"]
    if experiment != "demo":  # the paper's weights and data, which the user passes
        files = user_weights(tmp_path)
        given += [
            f"{k}={v}" for k, v in files.items() if experiment == "finetune" or "init" not in k
        ]
    check_config(tiny_cfg(*given))
    if trainer != "fsdp":
        check_config(tiny_cfg(*given, "callbacks=ema"))


def test_the_paper_metrics_need_their_clip_weights_before_anything_loads(
    tiny_cfg, tmp_path, no_model_build
):
    files = user_weights(tmp_path)
    given = [f"{k}={v}" for k, v in files.items() if k != "model.init_from"]
    paper = [g for g in given if not g.startswith("metrics_clip")]
    expect_config_error(
        tiny_cfg("experiment=paper", *paper),
        r"^metrics_clip\.checkpoint is required by callbacks\.edit_metrics: .*every_n_validations=0",
    )
    expect_config_error(
        tiny_cfg("experiment=paper", *paper, f"metrics_clip.checkpoint={tmp_path}/nope.bin"),
        r"^metrics_clip\.checkpoint=.*nope\.bin: no such file",
    )
    check_config(tiny_cfg("experiment=paper", *given))  # and with them, nothing is missing


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


# -- every mistake at once --------------------------------------------------------------------
def test_every_bad_value_is_listed_in_one_message(tiny_cfg, no_model_build):
    bad = ["model.optimizer.lr=-1", "data.batch_size=0", "trainer.precision=fp16"]
    with pytest.raises(ConfigError) as info:
        train(tiny_cfg(*bad, "model.cfg_dropout=2"))
    lines = str(info.value).splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "model.optimizer.lr",
        "model.cfg_dropout",
        "data.batch_size",
        "trainer.precision",
    ]


def test_every_wrong_path_and_unset_key_is_listed(tiny_cfg, tmp_path):
    problems = config_problems(
        tiny_cfg(
            "experiment=finetune",
            f"model.encoder.checkpoint={tmp_path}/l14.bin",
            f"data.shards='{tmp_path}/train-{{000000..000003}}.tar'",
            f"ckpt_path={tmp_path}/old.ckpt",
        )
    )
    assert len(problems) == 5, problems
    assert problems[0].startswith("model.init_from is not set (??? in the config): pass ")
    assert problems[1].startswith(f"model.encoder.checkpoint={tmp_path}/l14.bin: no such file")
    assert problems[2].startswith("4 of 4 shards in data.shards do not exist")
    assert problems[3].startswith(f"ckpt_path={tmp_path}/old.ckpt does not exist")
    assert problems[4].startswith("metrics_clip.checkpoint is required by callbacks.edit_metrics")
    # The model.backbone.path=${model.init_from} of experiment=finetune is the same mistake.
    assert not any(p.startswith("model.backbone.path") for p in problems)


def test_a_diffusers_folder_without_its_parts_is_named(tiny_cfg, tmp_path):
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    (tmp_path / "sd" / "vae" / "config.json").write_text("{}")
    (tmp_path / "b32.bin").touch()
    cfg = tiny_cfg(
        "experiment=paper",
        f"model.backbone.path={tmp_path}/sd",
        "model/encoder=tiny",
        f"metrics_clip.checkpoint={tmp_path}/b32.bin",
        "data=demo",
    )
    assert config_problems(cfg) == [
        f"model.backbone.path={tmp_path}/sd has no unet/config.json, so it is not a diffusers "
        "folder: pass model.backbone.path=<diffusers folder or SD .safetensors/.ckpt file>, or "
        "use model/backbone=tiny"
    ]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_the_paper_recipe_with_three_wrong_paths_lists_all_three_at_once(
    tmp_path, cache_dir, small_shards
):
    args = ["experiment=paper", "debug=tiny", small_shards[-1], f"hydra.run.dir={tmp_path}/run"]
    args += [f"model.backbone.path={tmp_path}/sd15", f"model.encoder.checkpoint={tmp_path}/l.bin"]
    args += [f"metrics_clip.checkpoint={tmp_path}/b32.bin"]
    result = run_train(args, cwd=tmp_path, cache=cache_dir, timeout=180)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert error_lines(result) == [
        f"error: model.backbone.path={tmp_path}/sd15: no such file or folder: pass "
        "model.backbone.path=<diffusers folder or SD .safetensors/.ckpt file>, or use "
        "model/backbone=tiny",
        f"error: model.encoder.checkpoint={tmp_path}/l.bin: no such file (local weights for "
        "ViT-L-14-quickgelu): fix the path, or use model/encoder=tiny",
        f"error: metrics_clip.checkpoint={tmp_path}/b32.bin: no such file (local weights for "
        "metrics_clip.arch=ViT-B-32-quickgelu); fix the path, or turn the metrics off with "
        "callbacks.edit_metrics.every_n_validations=0",
    ]
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- evaluate.py --------------------------------------------------------------------------------
def eval_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def test_evaluate_lists_every_unset_key_and_missing_file(tmp_path):
    assert [p.split(" ")[0] for p in eval_config_problems(eval_cfg())] == [
        "ckpt_path",
        "benchmark",
        "real_images",
        "clip.checkpoint",
    ]
    problems = eval_config_problems(
        eval_cfg(
            f"ckpt_path={tmp_path}/last.ckpt",
            f"benchmark={tmp_path}/cocoee",
            f"real_images={tmp_path}",
            f"clip.checkpoint={tmp_path}/b32.bin",
            "batch_size=0",
        )
    )
    assert [p.split(":")[0] for p in problems] == [
        f"ckpt_path={tmp_path}/last.ckpt",
        f"benchmark={tmp_path}/cocoee",
        f"clip.checkpoint={tmp_path}/b32.bin",
        "batch_size=0 must be a whole number >= 1",
    ]


def test_evaluate_without_arguments_says_what_to_pass_without_a_traceback(tmp_path, cache_dir):
    env = dict(os.environ, PBE_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO))
    command = [sys.executable, str(REPO / "evaluate.py"), f"hydra.run.dir={tmp_path}/eval"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "MissingMandatoryValue" not in result.stderr
    assert [line.split(" ")[1] for line in error_lines(result)] == [
        "ckpt_path",
        "benchmark",
        "real_images",
        "clip.checkpoint",
    ]
