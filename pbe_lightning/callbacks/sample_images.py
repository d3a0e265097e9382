"""Paint a few validation samples and log the grid: source | mask | reference | edit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from pbe_lightning.images import batch_rows, panel_grid, save_grid

COLUMNS = ("source", "hole", "reference", "edit")


def edit_grid(batch: dict, edits: torch.Tensor, limit: int) -> torch.Tensor:
    """One row per sample: source, hole (white), reference, edit pasted into the hole; [0, 1].

    Pasting back shows exactly what the model painted, next to untouched context.
    """
    n = min(limit, edits.shape[0])
    size = tuple(batch["image"].shape[-2:])
    source = batch["image"][:n] * 0.5 + 0.5
    hole = 1 - batch["mask"][:n]  # user-facing: white = edit
    keep = batch["mask"][:n]
    edit = (batch["image"][:n] * keep + edits[:n] * (1 - keep)) * 0.5 + 0.5
    rows = batch_rows(source, hole, batch["reference"][:n], edit)
    # The reference is smaller than the other panels: resized to their size.
    return panel_grid(rows, size, mode="bilinear", antialias=False, labels=COLUMNS)


class SampleImages(L.Callback):
    def __init__(
        self, dirpath: str, every_n_validations: int = 1, max_images: int = 8, seed: int = 0
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every = every_n_validations
        self.max_images = max_images
        self.seed = seed
        self._validations = 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs,
        batch,
        batch_idx,
        dataloader_idx=0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        edits = pl_module.paint(batch, generator=generator)
        self._publish(trainer, edit_grid(batch, edits, self.max_images))

    @rank_zero_only
    def _publish(self, trainer: L.Trainer, grid: torch.Tensor) -> None:
        save_grid(grid, self.dirpath / f"step_{trainer.global_step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                caption = "source | hole | reference | edit (pasted into the hole)"
                logger.log_image("val/samples", [grid], step=trainer.global_step, caption=[caption])
