"""The memory plan against the measured peak of real training steps.

    python -m bench.memory_plan --device cpu [train.py overrides]     # allocator events
    python -m bench.memory_plan --device cuda --weights random experiment=paper trainer=gpu

Plans the run (``pbe_lightning.plan``, training step only), then trains ``--steps`` steps of
the real module with Lightning on batches of the configured shape and measures the peak:

- CUDA: ``torch.cuda.max_memory_allocated`` from the start of training.
- CPU: torch has no allocator counters for the CPU, so the profiler's memory events are
  summed (``profile_memory=True``: every allocation and free of torch's CPU allocator, with
  its size, kernels' own buffers included). Tensors alive before the window (weights,
  buffers, EMA copies) are added from their storages; gradients and optimiser state do not
  exist yet when it opens, so every later tensor is seen both allocated and freed.

Both count the bytes of live tensors, the plan's definition of the peak. ``--weights files``
builds the module as train.py does (weight files must exist); ``random`` builds it from the
architecture configs with random weights (the paper's architecture without its weights).
Last line: ``planned <P> MiB, measured <M> MiB, planned/measured <R>``.
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, IterableDataset

from pbe_lightning.models.build import build_model
from pbe_lightning.plan import plan
from pbe_lightning.plan.build_meta import build_module
from pbe_lightning.plan.config import (
    EMA_TARGET,
    FROZEN_DTYPE_TARGET,
    RunSettings,
    compose_train_config,
    run_settings,
)
from pbe_lightning.plan.memory import WEIGHTS_TRAINABLE, LiveMemory
from pbe_lightning.utils.instantiators import instantiate

MIB = 2**20


class Batches(IterableDataset):
    """Batches of the configured shape, made as the loader would make them (on the host)."""

    def __init__(self, settings: RunSettings, count: int) -> None:
        self.settings, self.count = settings, count

    def __iter__(self):
        s = self.settings
        for _ in range(self.count):
            image = torch.rand(s.batch_size, 3, s.resolution, s.resolution) * 2 - 1
            mask = torch.ones(s.batch_size, 1, s.resolution, s.resolution)
            reference = torch.rand(s.batch_size, 3, s.reference_size, s.reference_size)
            yield {
                "image": image,
                "mask": mask,
                "masked_image": image * mask,
                "reference": reference,
            }


def storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class MeasuredPeak(L.Callback):
    """The peak bytes of live tensors on the training device while training runs."""

    def __init__(self, op_level: bool = False) -> None:
        self.peak = 0
        self.op_level = LiveMemory() if op_level else None  # what the plan counts, on real ops
        self._profiler: profile | None = None
        self._static = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            return
        tensors = [*pl_module.parameters(), *pl_module.buffers()]
        for callback in trainer.callbacks:
            tensors += list(getattr(callback, "shadow", {}).values())  # the EMA's copies
        self._static = storage_bytes(tensors)
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        if self.op_level is not None:
            self.op_level.track(tensors, WEIGHTS_TRAINABLE)
            self.op_level.__enter__()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._profiler is None:
            self.peak = torch.cuda.max_memory_allocated(pl_module.device)
            return
        if self.op_level is not None:
            self.op_level.__exit__(None, None, None)
        self._profiler.__exit__(None, None, None)
        events = [
            e for e in self._profiler.profiler.kineto_results.events() if e.name() == "[memory]"
        ]
        live = highest = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()
            highest = max(highest, live)
        self.peak = self._static + highest


def measure(
    overrides: list[str], device: str, weights: str, steps: int, op_level: bool = False
) -> MeasuredPeak:
    cfg = compose_train_config(overrides)
    settings = run_settings(cfg, device)
    torch.manual_seed(0)
    module = build_model(cfg.model) if weights == "files" else build_module(cfg.model, None).module
    kept = (EMA_TARGET, FROZEN_DTYPE_TARGET)  # the callbacks that hold tensors on the device
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c.get("_target_") in kept]
    probe = MeasuredPeak(op_level and device == "cpu")
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=settings.precision,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=settings.accumulate,
        gradient_clip_val=settings.gradient_clip_val,
        callbacks=[*callbacks, probe],
    )
    loader = DataLoader(Batches(settings, steps * settings.accumulate), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--weights", choices=["files", "random"], default="files")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--op-level",
        action="store_true",
        help="CPU: also count tensors op by op on the real run (as the plan does on fake ones): "
        "tells kernels' own buffers from a planning error",
    )
    args = parser.parse_args()
    # One device, no metrics CLIP: what the measured loop holds (single-device strategy).
    overrides = [*args.overrides, "callbacks.edit_metrics.every_n_validations=0"]
    start = time.perf_counter()
    planned = plan(compose_train_config(overrides), args.device, False, False)
    plan_s = time.perf_counter() - start
    if planned.settings.strategy != "single":
        print(f"note: planned with strategy {planned.settings.strategy}; measured on one device")
    start = time.perf_counter()
    probe = measure(overrides, args.device, args.weights, args.steps, args.op_level)
    measured = probe.peak
    details = {
        "planned_breakdown_mib": {k: round(v / MIB, 1) for k, v in planned.breakdown.items()},
        "planned_phase": planned.peak_phase,
        "plan_s": round(plan_s, 1),
        "measure_s": round(time.perf_counter() - start, 1),
    }
    if probe.op_level is not None:
        details["measured_op_level_mib"] = round(probe.op_level.peak / MIB, 1)
        details["op_level_breakdown_mib"] = {
            k: round(v / MIB, 1) for k, v in probe.op_level.peak_live.items()
        }
    print(json.dumps(details))
    print(
        f"planned {planned.train_peak / MIB:.1f} MiB, measured {measured / MIB:.1f} MiB, "
        f"planned/measured {planned.train_peak / measured:.3f}"
    )


if __name__ == "__main__":
    main()
