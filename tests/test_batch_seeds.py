"""Every training batch draws from its own seeds: per rank, per batch, the same after a resume.

The 2-rank runs (different draws on every rank at every step, exact resume) are in
``tests/test_scale.py``; these check the same contract in one process, quickly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import product
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from pbe_lightning.batch_seeds import PURPOSES, SEEDS_KEY, BatchSeeds
from pbe_lightning.callbacks.rng_state import RngState, capture_rng, restore_rng
from pbe_lightning.models.build import build_model
from tests.helpers.config import REPO
from tests.helpers.draws import digest


@pytest.fixture
def datamodule(tiny_cfg):
    def make(rank: int = 0, world_size: int = 2, training: bool = True, *overrides: str):
        datamodule = instantiate(tiny_cfg(*overrides).data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        # What the hooks read of a DDP trainer: the rank, the world and the stage.
        datamodule.trainer = SimpleNamespace(
            global_rank=rank, world_size=world_size, training=training
        )
        return datamodule

    return make


def raw_batch(datamodule) -> dict:
    """The loader's first batch, as Lightning hands it to the transfer hooks (fresh copies)."""
    batch = next(iter(datamodule.train_dataloader()))
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def transferred(datamodule, batch: dict) -> dict:
    batch = dict(batch)
    batch = datamodule.on_before_batch_transfer(batch, 0)
    return datamodule.on_after_batch_transfer(batch, 0)


def test_seeds_differ_per_rank_batch_and_purpose_and_stay_the_same_in_any_process():
    seeds = {
        BatchSeeds(23, rank, index).seed_for(purpose)
        for rank, index, purpose in product(range(8), range(100), PURPOSES)
    }
    assert len(seeds) == 8 * 100 * len(PURPOSES)
    # A resumed run is a new process: the derivation must not depend on one (hash() would).
    code = "from pbe_lightning.batch_seeds import BatchSeeds as S; print(S(23, 1, 7).seed_for('diffusion'))"
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert int(other.stdout) == BatchSeeds(23, 1, 7).seed_for("diffusion")
    with pytest.raises(ValueError, match="unknown draw purpose 'noise'"):
        BatchSeeds(23, 0, 0).seed_for("noise")


def test_the_transfer_hook_gives_each_rank_its_own_masks_and_augmentation(datamodule):
    ranks = [datamodule(rank) for rank in (0, 1)]
    batch = raw_batch(ranks[0])  # the same records on both ranks: only the draws can differ
    before = torch.get_rng_state()
    zero, one = (transferred(dm, batch) for dm in ranks)
    again = transferred(datamodule(0), batch)
    assert zero[SEEDS_KEY] == BatchSeeds(ranks[0].seed, 0, 0)
    assert one[SEEDS_KEY] == BatchSeeds(ranks[0].seed, 1, 0)
    assert not torch.equal(zero["mask"], one["mask"])
    assert not torch.equal(zero["reference"], one["reference"])
    assert torch.equal(zero["mask"], again["mask"])  # rank and batch index decide, nothing else
    assert torch.equal(zero["reference"], again["reference"])
    assert torch.equal(torch.get_rng_state(), before)  # not one value from the global generator


def test_validation_batches_get_no_seeds(datamodule):
    dm = datamodule(0, 2, False)
    assert SEEDS_KEY not in transferred(dm, raw_batch(dm))


def step_draws(model, batch: dict) -> dict:
    """The timesteps, noise and dropout a training step computes its loss on."""
    seen = {}
    add_noise, draw_dropout = model.noise_scheduler.add_noise, model.draw_dropout

    def recorded_add_noise(latents, noise, timesteps):
        seen.update(t=timesteps.tolist(), noise=digest(noise))
        return add_noise(latents, noise, timesteps)

    def recorded_dropout(batch_size, generator=None):
        seen["drop"] = digest(torch.rand(64, generator=generator_twin(generator)))
        return draw_dropout(batch_size, generator)

    model.noise_scheduler.add_noise, model.draw_dropout = recorded_add_noise, recorded_dropout
    try:
        seen["loss"] = model.training_step(batch, 0).item()
    finally:
        del model.noise_scheduler.add_noise, model.draw_dropout
    return seen


def generator_twin(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None:
        return None
    twin = torch.Generator()
    twin.set_state(generator.get_state())
    return twin


def test_the_training_step_draws_from_the_batchs_seeds_only(tiny_cfg, datamodule):
    model = build_model(tiny_cfg().model)
    model.log = lambda *args, **kwargs: None  # no trainer to log to
    dm = datamodule(0)
    batch = transferred(dm, raw_batch(dm))
    before = torch.get_rng_state()
    first = step_draws(model, batch)
    assert torch.equal(torch.get_rng_state(), before)  # nothing from the global generator
    torch.manual_seed(1234)  # another global state changes nothing
    assert step_draws(model, batch) == first
    other_rank = step_draws(model, {**batch, SEEDS_KEY: BatchSeeds(dm.seed, 1, 0)})
    next_batch = step_draws(model, {**batch, SEEDS_KEY: BatchSeeds(dm.seed, 0, 1)})
    for other in (other_rank, next_batch):
        assert other["t"] != first["t"] and other["noise"] != first["noise"]
        assert other["drop"] != first["drop"] and other["loss"] != first["loss"]


@pytest.fixture
def global_generators_kept():
    """The test reseeds the global generators; later tests get them back as they were."""
    state = capture_rng()
    yield
    restore_rng(state)


@pytest.mark.usefixtures("global_generators_kept")
def test_global_generators_are_seeded_per_rank_and_each_rank_gets_its_own_back():
    trainers = [SimpleNamespace(global_rank=r, world_size=2, global_step=5) for r in (0, 1)]
    states = []
    for trainer in trainers:
        callback = RngState(seed=23)
        callback.on_train_start(trainer, None)  # a fresh run
        states.append(torch.get_rng_state())
        torch.rand(3)  # training goes on
    assert not torch.equal(states[0], states[1])

    saved = {"format": 2, "ranks": []}
    for trainer in trainers:  # what state_dict gathers from the ranks
        torch.manual_seed(trainer.global_rank)
        saved["ranks"].append(RngState(seed=23).state_dict()["ranks"][0])
    for trainer in trainers:
        callback = RngState(seed=23)
        callback.load_state_dict(saved)  # the same checkpoint on every rank
        callback.on_train_start(trainer, None)
        assert torch.equal(torch.get_rng_state(), saved["ranks"][trainer.global_rank]["torch"])


def test_the_paper_recipe_drops_the_exemplar_of_a_whole_batch_once_per_step_and_rank(tiny_cfg):
    recipe = tiny_cfg("experiment=paper").model
    assert (recipe.cfg_dropout, recipe.cfg_dropout_mode) == (0.2, "per_batch")
    model = build_model(tiny_cfg("model.cfg_dropout=0.2", "model.cfg_dropout_mode=per_batch").model)
    drops = {}
    for rank, index in product((0, 1), range(1000)):
        generator = BatchSeeds(23, rank, index).generator("cfg_dropout", "cpu")
        drop = model.draw_dropout(4, generator)
        assert drop.all() or not drop.any()  # the whole per-GPU batch, or none of it
        drops[rank, index] = bool(drop[0])
    rates = [sum(drops[rank, i] for i in range(1000)) / 1000 for rank in (0, 1)]
    assert all(0.15 < rate < 0.25 for rate in rates), rates  # 4 standard deviations
    assert [drops[0, i] for i in range(1000)] != [drops[1, i] for i in range(1000)]
