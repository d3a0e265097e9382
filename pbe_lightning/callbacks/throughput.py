"""Logs ``perf/samples_per_s``: training samples per second across all ranks."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._start: float | None = None
        self._samples = 0
        self._steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:  # the first step includes start-up costs: not timed
            self._start = time.perf_counter()
            return
        self._samples += batch["image"].shape[0] * trainer.world_size
        self._steps += 1
        if self._steps == self.window:
            rate = self._samples / (time.perf_counter() - self._start)
            pl_module.log("perf/samples_per_s", rate, rank_zero_only=True)
            self._start, self._samples, self._steps = time.perf_counter(), 0, 0
