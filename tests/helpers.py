"""Test-only components a config can point at (``+callbacks.x._target_=tests.helpers.X``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class BatchCounter(L.Callback):
    """Writes how many training batches this rank saw to ``{dirpath}/batches_rank{r}.json``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.count += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "batches": self.count,
        }
        (self.dirpath / f"batches_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class SignalAt(L.Callback):
    """Sends this process ``signal`` when training reaches ``step`` (a test's preemption)."""

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        self.step = step
        self.signal = signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os
        import signal as signals

        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signals, self.signal))
