"""docs/paper_recipe.md is kept true: every row is `same` or says why not, every test it names
exists, and the rows no other test pins are pinned here."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from hydra.utils import instantiate

from pbe_lightning.models.encoder import Mapper
from pbe_lightning.models.lr_schedules import linear_warmup
from pbe_lightning.models.samplers import make_sampler
from tests.helpers.config import REPO

RECIPE = REPO / "docs" / "paper_recipe.md"


def recipe_rows() -> list[list[str]]:
    rows = []
    for line in RECIPE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and cells[0] != "knob" and "---" not in line:
            rows.append(cells)
    return rows


def defined_tests(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_every_row_is_the_same_or_says_why_not_and_names_a_test_that_exists():
    rows = recipe_rows()
    assert len(rows) >= 40
    for knob, _original, _ours, same, test in rows:
        assert same == "same" or re.fullmatch(r"differs: .{20,}", same), (knob, same)
        match = re.fullmatch(r"`(tests/\w+\.py)::(\w+)`", test)
        assert match, (knob, test)
        assert match[2] in defined_tests(match[1]), f"{knob}: {test} does not exist"


def test_the_repository_cites_no_file_outside_it():
    # Users have the repository only: the notes it was written from are not theirs to read.
    outside = ("METHOD" + ".md", ".." + "/shared")
    texts = [REPO / "README.md", RECIPE, *REPO.glob("pbe_lightning/**/*.py")]
    for path in [*texts, *REPO.glob("conf/**/*.yaml"), *REPO.glob("data/*.py")]:
        text = path.read_text()
        assert not any(name in text for name in outside), path


def test_the_mapper_is_five_one_head_blocks_then_a_norm_and_a_projection(tiny_cfg):
    cfg = tiny_cfg("experiment=paper")
    assert cfg.model.encoder.mapper_depth == 5 and cfg.model.encoder.bottleneck == "cls"
    mapper = Mapper(1024, 5)
    assert len(mapper.blocks) == 5
    for block in mapper.blocks:
        assert block.attn1.heads == 1 and block.attn1.inner_dim == 1024
        assert block.attn2 is None  # self-attention only: the exemplar token attends to itself
        hidden, out = block.ff.net[0].proj, block.ff.net[2]
        assert (hidden.in_features, hidden.out_features) == (1024, 4096)  # 4x, not gated
        assert (out.in_features, out.out_features) == (4096, 1024)


def test_the_learning_rate_warms_up_linearly_for_10k_steps_then_stays(tiny_cfg):
    cfg = tiny_cfg("experiment=paper")
    assert cfg.model.lr_scheduler.warmup_steps == 10_000
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-5)
    schedule = instantiate(cfg.model.lr_scheduler)(optimizer)
    factors = []
    for _ in range(12_000):
        factors.append(optimizer.param_groups[0]["lr"] / 1e-5)
        optimizer.step()
        schedule.step()
    assert factors[0] == pytest.approx(1e-4)
    assert factors[4_999] == pytest.approx(0.5)
    assert factors[9_999] == pytest.approx(1.0) and factors[11_999] == 1.0
    assert all(b > a for a, b in zip(factors[:9_999], factors[1:10_000]))
    assert isinstance(schedule, type(linear_warmup(optimizer, 1)))


@pytest.mark.parametrize("sampler", ["pndm", "ddim"])
def test_fifty_sampling_steps_run_from_981_to_1(tiny_cfg, sampler):
    cfg = tiny_cfg("experiment=paper")
    scheduler = make_sampler(sampler, instantiate(cfg.model.noise_scheduler))
    scheduler.set_timesteps(50)
    steps = scheduler.timesteps.tolist()
    assert steps[0] == 981 and steps[-1] == 1 and sorted(set(steps)) == list(range(1, 982, 20))
    # The last step goes to alphas_cumprod[0], not to 1 (the public code's final alpha).
    assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]


def test_the_paper_recipe_trains_in_fp32_with_checkpointing_and_no_ema(tiny_cfg):
    cfg = tiny_cfg("experiment=paper", "trainer.max_steps=-1")
    assert cfg.trainer.precision == "32-true"
    assert cfg.model.gradient_checkpointing is True
    targets = [c.get("_target_", "") for c in cfg.callbacks.values() if c is not None]
    assert not any("ema" in target.lower() for target in targets)
