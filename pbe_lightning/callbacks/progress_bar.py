"""The TQDM progress bar, showing the training loss without a device sync every step.

Lightning turns every metric logged with ``prog_bar=True`` into a Python number at the end
of every batch, whether or not the bar redraws: one device-to-host sync per step. This bar
redraws every ``refresh_rate`` steps (the config ties it to ``trainer.log_every_n_steps``)
and only then reads the metrics it shows from ``trainer.callback_metrics``.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class SyncFreeProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 50, shown: Sequence[str] = ("train/loss",)) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.shown = tuple(shown)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        for name in self.shown:
            value = trainer.callback_metrics.get(name)
            if value is not None:
                items[name] = f"{float(value):.4g}"
        return items
