"""SIGTERM / SIGUSR1: save a checkpoint at the end of the current step and exit cleanly.

Clusters announce preemption with a signal; training stops at a step boundary (never mid-
update), writes ``last.ckpt`` and returns, so ``ckpt_path=last`` continues exactly. Ranks
agree on the decision each step, so a signal seen by one rank stops all of them together.
Under SLURM with auto-requeue, Lightning's own SIGUSR1 handling (save + requeue) stays in
charge of SIGUSR1; this callback then only handles SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    def __init__(self, dirpath: str, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")) -> None:
        self.dirpath = Path(dirpath)
        self.signals = signals
        self._received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self._received = signal.Signals(signum).name

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        under_slurm = "SLURM_JOB_ID" in os.environ
        for name in self.signals:
            if name == "SIGUSR1" and under_slurm:
                continue
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self._received is not None, all=False)
        if not stop:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning(
            "received %s: saved %s at step %d, stopping", self._received, path, trainer.global_step
        )
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
