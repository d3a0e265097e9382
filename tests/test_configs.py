"""Every config option composes, and each experiment means what it says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pbe_lightning.utils.overrides import quote_brace_patterns
from tests.helpers.config import CONF, REPO, TINY

GROUPS = [
    "data",
    "data/augment",
    "data/mask",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
    "ablation",
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


def test_a_list_mixing_brace_patterns_and_files_parses_as_a_user_writes_it(tiny_cfg):
    """The usual way to mix datasets: one argument, a list holding a brace pattern."""
    argv = ["data.shards=[/a/x-{000..009}.tar,/b.tar,/c/{s3,gs}-{0..1}.tar]"]
    quoted = quote_brace_patterns(argv)
    assert quoted == ['data.shards=["/a/x-{000..009}.tar",/b.tar,"/c/{s3,gs}-{0..1}.tar"]']
    cfg = tiny_cfg(*quoted)
    assert list(cfg.data.shards) == ["/a/x-{000..009}.tar", "/b.tar", "/c/{s3,gs}-{0..1}.tar"]


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


# The sweep grids of the method's ablations (conf/ablation/): -m ablation=NAME on any recipe.
ABLATIONS = {
    "bottleneck": {"model.encoder.bottleneck": "cls,tokens", "model.encoder.mapper_depth": "1,5"},
    "augment": {"data/augment": "none,paper,strong"},
    "mask": {"data/mask": "box,irregular,paper"},
    "cfg": {"model.cfg_dropout": "0.0,0.1,0.2", "model.cfg_dropout_mode": "per_sample,per_batch"},
    "encoder": {"model/encoder": "clip,openclip,siglip,dinov2"},
}
# What a grid may set besides: ablation=encoder's weights file per family (tests/test_encoders.py).
GRID_EXTRAS = {"encoder": "encoder_weights"}


def compose_with_hydra(*overrides: str) -> DictConfig:
    """``train.yaml`` with ``debug=tiny``, the ``hydra`` node kept (sweeper params, choices)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[*TINY, *overrides], return_hydra_config=True)


def grid_points(grid: dict[str, str]) -> list[dict[str, str]]:
    points = [{}]
    for key, values in grid.items():
        points = [{**point, key: value} for point in points for value in values.split(",")]
    return points


def test_ablations_are_sweep_grids_not_recipes():
    assert options("ablation") == sorted(ABLATIONS)
    assert not [name for name in options("experiment") if "ablat" in name]
    for name, grid in ABLATIONS.items():
        content = yaml.safe_load((CONF / "ablation" / f"{name}.yaml").read_text())
        content.pop(GRID_EXTRAS.get(name, ""), None)
        assert content == {
            "hydra": {"sweeper": {"params": grid}},
            # Every variant of a grid is compared on the paper's metrics while it trains.
            "callbacks": {"edit_metrics": {"every_n_validations": 1}},
        }


@pytest.mark.parametrize("recipe", ["demo", "paper"])
@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_every_ablation_composes_with_every_recipe(recipe, ablation):
    cfg = compose_with_hydra(f"experiment={recipe}", f"ablation={ablation}")
    assert cfg.hydra.runtime.choices.experiment == recipe
    assert cfg.hydra.runtime.choices.ablation == ablation
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == ABLATIONS[ablation]
    base = compose_with_hydra(f"experiment={recipe}")
    assert cfg.model == base.model and cfg.data == base.data and cfg.trainer == base.trainer
    # Each job of the grid is the recipe with that point's overrides: every value lands.
    for point in grid_points(ABLATIONS[ablation]):
        job = compose_with_hydra(
            f"experiment={recipe}", f"ablation={ablation}", *(f"{k}={v}" for k, v in point.items())
        )
        for key, value in point.items():
            if "/" in key:  # a config group: its option is chosen
                assert job.hydra.runtime.choices[key] == value
            else:
                assert OmegaConf.select(job, key) == yaml.safe_load(value), (key, value)


# A stand-in for train.py: the same config tree and Hydra multirun, printing each job's
# swept values and W&B settings instead of training.
PROBE = """
import json
import hydra
from omegaconf import OmegaConf
import pbe_lightning.utils.resolvers

@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg):
    job = {"wandb": OmegaConf.to_container(cfg.logger.wandb, resolve=True)}
    job["mask"] = cfg.data.mask.irregular_prob
    job["encoder"] = OmegaConf.to_container(cfg.model.encoder, resolve=True)
    print("JOB " + json.dumps(job))

main()
"""


def sweep(tmp_path: Path, *overrides: str) -> list[dict]:
    script = tmp_path / "probe.py"
    script.write_text(f"CONF = {str(CONF)!r}\n" + PROBE)
    done = subprocess.run(
        # The probe trains nothing: no weights to check before it, no metrics to summarise.
        [sys.executable, str(script), "-m", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        + ["~hydra.callbacks.check_every_job", "~hydra.callbacks.summarise_sweep"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("JOB ")]


def test_an_ablation_sweep_runs_its_grid_in_one_tagged_wandb_group(tmp_path):
    # python train.py -m ablation=mask debug=tiny: the mask grid on the demo, one job a shape.
    jobs = sweep(
        tmp_path, "ablation=mask", "debug=tiny", "logger=wandb", f"paths.cache_dir={tmp_path}"
    )
    assert [job["mask"] for job in jobs] == [0.0, 1.0, 0.5]  # box, irregular, paper
    wandb = [job["wandb"] for job in jobs]
    assert {w["group"] for w in wandb} == {"demo+ablation=mask/sweep"}
    assert all(w["tags"] == ["demo", "ablation=mask"] for w in wandb)
    # Named by what varies in the group; paths and the shared overrides are in the config.
    assert [w["name"] for w in wandb] == ["data/mask=box", "data/mask=irregular", "data/mask=paper"]


def test_command_line_values_narrow_an_ablation_grid_on_any_recipe(tmp_path):
    jobs = sweep(
        tmp_path,
        "experiment=paper",
        "ablation=bottleneck",
        "model.encoder.mapper_depth=5",
        "debug=tiny",
        "logger=wandb",
    )
    encoders = [(job["encoder"]["bottleneck"], job["encoder"]["mapper_depth"]) for job in jobs]
    assert encoders == [("cls", 5), ("tokens", 5)]
    assert jobs[0]["wandb"]["tags"] == ["paper", "ablation=bottleneck"]
    assert jobs[0]["wandb"]["group"] == "paper+ablation=bottleneck/sweep"


@pytest.mark.parametrize(
    ("overrides", "tags"),
    [([], ["demo"]), (["experiment=paper", "ablation=mask"], ["paper", "ablation=mask"])],
)
def test_train_cfg_job_resolves_the_wandb_tags(overrides, tags):
    done = subprocess.run(
        [sys.executable, "train.py", *overrides, "debug=tiny", "logger=wandb", "--cfg", "job"]
        + ["--resolve"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    wandb = yaml.safe_load(done.stdout)["logger"]["wandb"]
    assert wandb["tags"] == tags and wandb["group"] is None  # a single run: no sweep group
