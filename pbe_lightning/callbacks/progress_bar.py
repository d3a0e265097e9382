"""The TQDM progress bar, showing the training loss without a device sync every step.

Lightning turns every metric logged with ``prog_bar=True`` into a Python number at the end
of every batch, whether or not the bar redraws: one device-to-host sync per step. This bar
redraws every ``refresh_rate`` steps (the config ties it to ``trainer.log_every_n_steps``)
and only then reads the metrics it shows from ``trainer.callback_metrics``.

It also counts what this framework's epochs really are. The stream is endless and an "epoch"
is ``data.batches_per_epoch`` batches between validations, so the bar shows ``Epoch N``, the
batches of this epoch that will actually run, and ``step=done/trainer.max_steps`` for the
whole run. Lightning's own total is ``min(batches per epoch, max_steps - global_step)``: it
counts optimiser steps as batches (wrong under ``trainer.accumulate_grad_batches``), and on a
resume in mid-epoch its bar reads ``Training`` with no total, counting from the epoch's start.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.trainer.states import TrainerFn


def batches_this_epoch(trainer: L.Trainer, done: int) -> int | float:
    """Batches the current epoch will run in all, ``done`` of them already (on a resume)."""
    batches = trainer.num_training_batches
    if trainer.max_steps > 0:
        steps_left = max(0, trainer.max_steps - trainer.global_step)
        batches = min(batches, done + steps_left * trainer.accumulate_grad_batches)
    return batches


class SyncFreeProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 50, shown: Sequence[str] = ("train/loss",)) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.shown = tuple(shown)
        self._epoch_drawn = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._epoch_drawn = False  # a resumed epoch gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        self._epoch_drawn = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        """The epoch's first batch (after a resume: its next one) fixes the bar's range."""
        if self._epoch_drawn or self.is_disabled:
            return
        self._epoch_drawn = True
        bar = self.train_progress_bar
        bar.reset(total=convert_inf(batches_this_epoch(trainer, batch_idx)))
        bar.initial = bar.n = bar.last_print_n = batch_idx
        bar.set_description(f"Epoch {trainer.current_epoch}")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the loggers' versions joined, cut to 4 characters: "lk_0"
        if trainer.state.fn == TrainerFn.FITTING:
            limit = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
            items = {"step": f"{trainer.global_step}{limit}", **items}
        for name in self.shown:
            value = trainer.callback_metrics.get(name)
            if value is not None:
                items[name] = f"{float(value):.4g}"
        return items
