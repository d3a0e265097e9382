"""Survive: exact resume after kill -9, SIGTERM checkpoints, EMA state, non-finite steps."""

import random

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from pbe_lightning.callbacks.ema import EMA
from pbe_lightning.models.build import build_model
from tests.helpers.config import SMALL_SHARDS, TINY
from tests.helpers.processes import run_train
from tests.helpers.training import bare_trainer

RUN = [
    *TINY,
    "trainer.max_steps=8",
    "data.batches_per_epoch=3",  # epoch ends and validations fall between kill points
    "data.num_workers=2",  # resume must also rotate the loader's worker order
    "callbacks=ema",
    "callbacks.ema.decay=0.9",
    "trainer.deterministic=true",
    *SMALL_SHARDS,
]


def final_state(run_dir):
    checkpoint = torch.load(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    return checkpoint


def assert_same_training(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for key in a["pbe_ema"]:
        assert torch.equal(a["pbe_ema"][key], b["pbe_ema"][key]), key
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()
    ):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path, cache_dir, small_shards):
    reference = tmp_path / "uninterrupted"
    result = run_train([*RUN, f"hydra.run.dir={reference}"], tmp_path, cache_dir)
    assert result.returncode == 0
    expected = final_state(reference)
    assert expected["global_step"] == 8

    kill_points = random.Random(7).sample(range(2, 8), 2)
    for step in kill_points:
        run_dir = tmp_path / f"killed_at_{step}"
        killer = [
            "+callbacks.kill._target_=tests.helpers.callbacks.SignalAt",
            f"+callbacks.kill.step={step}",
        ]
        result = run_train([*RUN, *killer, f"hydra.run.dir={run_dir}"], tmp_path, cache_dir)
        assert result.returncode == -9, f"the run was meant to die at step {step}"
        partial = final_state(run_dir)  # last.ckpt must be loadable after a kill
        assert partial["global_step"] <= step
        result = run_train(
            [*RUN, "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path, cache_dir
        )
        assert result.returncode == 0
        assert_same_training(final_state(run_dir), expected)


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path, cache_dir, small_shards):
    run_dir = tmp_path / "term"
    signal = [
        "+callbacks.term._target_=tests.helpers.callbacks.SignalAt",
        "+callbacks.term.step=3",
        "+callbacks.term.signal=SIGTERM",
    ]
    result = run_train(
        [*RUN, *signal, "callbacks.checkpoint.every_n_train_steps=100", f"hydra.run.dir={run_dir}"],
        tmp_path,
        cache_dir,
    )
    assert result.returncode == 0
    checkpoint = final_state(run_dir)
    assert checkpoint["global_step"] == 4  # the step in flight finishes, then it stops
    assert "pbe_ema" in checkpoint and "DataModule" in "".join(checkpoint)


def test_ema_averages_only_taken_steps_and_round_trips(tiny_cfg):
    model = build_model(tiny_cfg().model)
    ema = EMA(decay=0.5)
    trainer = type("T", (), {"global_step": 1, "sanity_checking": False, "strategy": None})()
    ema.on_fit_start(trainer, model)
    start = {n: t.clone() for n, t in ema.shadow.items()}
    with torch.no_grad():
        for p in EMA.tracked(model).values():
            p.add_(1.0)
    ema.on_train_batch_end(trainer, model, None, None, 0)  # skipped step: no update
    assert all(torch.equal(ema.shadow[n], start[n]) for n in start)
    ema.on_train_batch_end(trainer, model, {"loss": 1}, None, 0)
    name = next(iter(start))
    assert torch.allclose(ema.shadow[name], start[name] + 0.5)
    checkpoint = {}
    ema.on_save_checkpoint(trainer, model, checkpoint)
    restored = EMA(decay=0.5)
    restored.on_load_checkpoint(trainer, model, checkpoint)
    assert all(torch.equal(restored.shadow[n], ema.shadow[n]) for n in start)
    with ema.swapped_in(model):
        assert torch.equal(dict(model.named_parameters())[name], ema.shadow[name])
    assert torch.allclose(dict(model.named_parameters())[name], start[name] + 1)


def test_ema_averages_once_per_optimiser_step_under_gradient_accumulation(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("trainer.max_steps=3")
    model, datamodule = build_model(cfg.model), instantiate(cfg.data)
    ema = EMA(decay=0.5)
    averaged = []
    real_lerp = torch._foreach_lerp_

    def counting_lerp(*args, **kwargs):
        averaged.append(1)
        return real_lerp(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting_lerp)
    trainer = bare_trainer(max_steps=3)
    trainer.accumulate_grad_batches = 2  # 6 batches, 3 optimiser steps
    trainer.callbacks.append(ema)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 3
    assert len(averaged) == 3  # not once per batch: decay**2 per step would be another EMA


def test_nonfinite_steps_are_skipped_then_stop_with_a_clear_error(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("model.max_nonfinite_steps=3", "trainer.max_steps=10")
    datamodule = instantiate(cfg.data)
    model = build_model(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def diverged(*args, **kwargs) -> torch.Tensor:  # NaN gradients in every trainable weight
        return sum(p.sum() for p in model.trainable_parameters()) * float("nan")

    monkeypatch.setattr(model, "diffusion_loss", diverged)
    trainer = bare_trainer(max_steps=10)
    with pytest.raises(
        RuntimeError, match="non-finite for 10 steps in a row.*model.max_nonfinite_steps=3"
    ):
        trainer.fit(model, datamodule=datamodule)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update was applied
    assert int(model.nonfinite_total) == 10
    assert trainer.global_step == 10  # skipped updates still count as steps, as in GradScaler


def test_a_skipped_update_leaves_weights_adam_state_and_ema_as_they_were(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("trainer.max_steps=4")
    model = build_model(cfg.model)
    datamodule = instantiate(cfg.data)
    ema = EMA(decay=0.5)
    real_loss = model.diffusion_loss
    calls = []

    def nan_on_third(*args, **kwargs) -> torch.Tensor:
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(model, "diffusion_loss", nan_on_third)
    snapshots = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            weights = {k: v.clone() for k, v in module.state_dict().items()}
            snapshots.append((weights, {k: v.clone() for k, v in ema.shadow.items()}))

    record = Record()
    trainer = bare_trainer(max_steps=4)
    trainer.callbacks.extend([ema, record])
    trainer.fit(model, datamodule=datamodule)
    (weights_2, ema_2), (weights_3, ema_3) = snapshots[1], snapshots[2]
    assert all(torch.equal(weights_2[k], weights_3[k]) for k in weights_2)
    assert all(torch.equal(ema_2[k], ema_3[k]) for k in ema_2)
    assert not all(torch.equal(snapshots[3][0][k], weights_3[k]) for k in weights_3)
    step = next(iter(trainer.optimizers[0].state.values()))["step"]
    assert int(step) == 3  # Adam counted the three updates taken, not the skipped one
