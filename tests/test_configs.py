"""Every config option composes, and each experiment means what it says."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pbe_lightning.utils.overrides import quote_brace_patterns
from tests.helpers.config import CONF

GROUPS = [
    "data",
    "data/augment",
    "data/mask",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
    "model/encoder",
    "model/backbone",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(tiny_cfg, group):
    key = group.replace("/", ".") if "/" in group else group
    for option in options(group):
        cfg = tiny_cfg(f"{group}={option}")
        OmegaConf.to_container(cfg, resolve=False)
        assert cfg is not None, (key, option)


def test_paper_experiment_is_the_method_recipe(tiny_cfg):
    cfg = tiny_cfg("experiment=paper", "trainer.max_steps=-1", "data.batch_size=4")
    model, data, trainer = cfg.model, cfg.data, cfg.trainer
    assert model.optimizer.lr == 1e-5 and model.lr_scheduler.warmup_steps == 10000
    assert model.cfg_dropout == 0.2 and model.gradient_checkpointing
    assert model.noise_scheduler.beta_schedule == "scaled_linear"
    assert (model.noise_scheduler.beta_start, model.noise_scheduler.beta_end) == (0.00085, 0.012)
    assert model.encoder.bottleneck == "cls" and model.encoder.mapper_depth == 5
    assert "quickgelu" in model.encoder.arch.lower()
    assert data.resolution == 512 and data.reference_size == 224 and data.batch_size == 4
    assert data.mask.irregular_prob == 0.5 and data.augment.hflip == 0.5
    assert (data.box_filter.min_area, data.box_filter.max_area) == (0.02, 0.8)
    assert trainer.strategy == "ddp" and trainer.max_epochs == 40 and cfg.seed == 23


def test_ablation_switches_are_config_only(tiny_cfg):
    cfg = tiny_cfg("data/mask=box", "data/augment=none", "model.encoder.bottleneck=tokens")
    assert cfg.data.mask.irregular_prob == 0.0 and cfg.data.augment.rotation == 0.0
    assert cfg.model.encoder.bottleneck == "tokens"
    assert instantiate(cfg.data.mask).irregular_prob == 0.0


def test_brace_shard_patterns_need_no_hydra_quoting():
    argv = [
        "train.py",
        "data.shards=/d/train-{000000..000009}.tar",
        "trainer.devices=2",
        'a="{1..2}"',
    ]
    assert quote_brace_patterns(argv) == [
        "train.py",
        'data.shards="/d/train-{000000..000009}.tar"',
        "trainer.devices=2",
        'a="{1..2}"',
    ]


def test_configs_are_documented_in_one_place():
    # No duplicated keys between variants and their base: variants only override.
    for group in ("data/mask", "data/augment"):
        base = OmegaConf.load(CONF / group / "paper.yaml")
        for path in Path(CONF / group).glob("*.yaml"):
            variant = OmegaConf.load(path)
            if path.stem == "paper":
                continue
            same = [k for k in variant if k != "defaults" and variant[k] == base.get(k)]
            assert not same, (path, same)
