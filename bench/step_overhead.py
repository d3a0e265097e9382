"""What the framework adds to a training step: Lightning with our callbacks vs a bare loop.

    OMP_NUM_THREADS=1 python -m bench.step_overhead             # the demo model, CPU, ~3 min
    python -m bench.step_overhead --device cuda --experiment demo
    python -m bench.step_overhead --rounds 7 --steps 30

Both sides run the same modules on the same pre-made batches (the demo config's loader
output, uint8 crops on the host), doing the same maths per step: move the batch to the
device, masks and augmentation (``device_transform``), the module's loss, backward, the
config's optimiser step. The Lightning side is ``train.py``'s trainer, with the default
callbacks and the CSV logger, logging every ``trainer.log_every_n_steps``; validation and periodic
checkpoints are switched off, since they are not per-step costs. Rounds alternate the two
sides in one process; a side's time is the median over rounds of its per-step time over
``--steps`` steps after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

import pbe_lightning.utils.resolvers  # noqa: F401  (the config's own resolvers)
from pbe_lightning.data.datamodule import device_transform
from pbe_lightning.data.stream import EpochOfBatches
from pbe_lightning.models.build import build_model
from pbe_lightning.train import make_trainer
from pbe_lightning.utils.instantiators import instantiate_each

CONF = Path(__file__).resolve().parents[1] / "conf"


def load_config(args: argparse.Namespace, output_dir: Path) -> DictConfig:
    overrides = [
        f"experiment={args.experiment}",
        "logger=csv",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "trainer.num_sanity_val_steps=0",
        "+trainer.limit_val_batches=0",
        "callbacks.checkpoint.every_n_train_steps=1000000",
        "callbacks.checkpoint.save_last=false",
        "trainer.enable_model_summary=false",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def premade_batches(cfg: DictConfig, count: int) -> tuple[list[dict], L.LightningDataModule]:
    datamodule = instantiate(cfg.data, num_workers=0)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader().loader)
    return [next(loader) for _ in range(count)], datamodule


class StepClock(L.Callback):
    """Times ``steps`` steps after ``warmup``: batch start to batch start, so each step's
    hooks, logging, fetch and transfer of the next batch are all inside."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.seconds_per_step: float | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            self._start = time.perf_counter()
        elif batch_idx == self.warmup + self.steps:
            synchronize(pl_module.device)
            self.seconds_per_step = (time.perf_counter() - self._start) / self.steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lightning_round(cfg, module, datamodule, batches: list[dict], clock: StepClock) -> float:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.trainer.max_steps = len(batches)
    trainer = make_trainer(cfg, instantiate_each(cfg.get("logger")))
    trainer.callbacks.append(clock)
    same_batches = EpochOfBatches([dict(b) for b in batches], len(batches))
    datamodule.train_dataloader = lambda: same_batches
    trainer.fit(module, datamodule=datamodule)
    assert clock.seconds_per_step is not None, "too few batches for warm-up + timed steps"
    return clock.seconds_per_step


def bare_round(module, datamodule, batches: list[dict], warmup: int, steps: int) -> float:
    device = module.device
    optimizer = module.configure_optimizers()["optimizer"]  # the config's, as Lightning builds
    module.train()
    start = 0.0
    for index, raw in enumerate(batches[: warmup + steps + 1]):
        if index == warmup:
            synchronize(device)
            start = time.perf_counter()
        elif index == warmup + steps:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in raw.items() if k != "stream_state"}
        batch = device_transform(batch, datamodule.masks, datamodule.augment, training=True)
        loss = module.diffusion_loss(batch, module.draw_dropout(batch["image"].shape[0]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.batch_size=8")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = load_config(args, Path(output_dir))
        L.seed_everything(cfg.seed)
        batches, datamodule = premade_batches(cfg, args.warmup + args.steps + 1)
        module = build_model(cfg.model).to(args.device)
        bare, framework = [], []
        for round_number in range(args.rounds):
            bare.append(bare_round(module, datamodule, batches, args.warmup, args.steps))
            clock = StepClock(args.warmup, args.steps)
            framework.append(lightning_round(cfg, module, datamodule, batches, clock))
            print(
                f"round {round_number}: bare {bare[-1] * 1000:.1f} ms/step, "
                f"lightning {framework[-1] * 1000:.1f} ms/step",
                flush=True,
            )
    bare_ms, framework_ms = statistics.median(bare) * 1000, statistics.median(framework) * 1000
    batch = cfg.data.batch_size
    print(f"\nexperiment={args.experiment}, batch {batch}, {args.device}, medians of {args.rounds}")
    print("| loop | ms/step |\n|---|---|")
    print(f"| bare PyTorch | {bare_ms:.1f} |\n| Lightning + our callbacks | {framework_ms:.1f} |")
    print(f"\nstep overhead vs bare loop: {(framework_ms / bare_ms - 1) * 100:.1f} %")


if __name__ == "__main__":
    main()
