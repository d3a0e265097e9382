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
