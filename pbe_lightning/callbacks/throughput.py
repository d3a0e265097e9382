"""Logs ``perf/samples_per_s``: training samples per second across all ranks.

Measured between logging steps, on the host clock: with no host sync between them, the CPU
runs ahead of the accelerator only as far as its launch queue allows, so over an interval the
host's rate is the device's.

Why not Lightning's ``ThroughputMonitor`` (2.6): it calls ``torch.cuda.synchronize()`` at the
end of every training batch to time each one, the per-step stall this framework avoids
(``pbe_lightning/logging_steps.py``, ``tests/test_step_syncs.py``); it also needs a
``batch_size_fn``, warns unless the module defines ``flops_per_batch``, and hands its values
to the loggers directly, not through ``self.log``: they never reach ``trainer.callback_metrics``.
"""

from __future__ import annotations

import time

import lightning as L

from pbe_lightning.logging_steps import is_logging_step


class Throughput(L.Callback):
    def __init__(self) -> None:
        self._start: float | None = None
        self._samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:  # the first step includes start-up costs: not timed
            self._start = time.perf_counter()
            return
        self._samples += batch["image"].shape[0] * trainer.world_size
        if is_logging_step(trainer):
            rate = self._samples / (time.perf_counter() - self._start)
            pl_module.log("perf/samples_per_s", rate, rank_zero_only=True)
            self._start, self._samples = time.perf_counter(), 0

    def on_validation_end(self, trainer, pl_module) -> None:
        self._start, self._samples = None, 0  # validation time is not training throughput
