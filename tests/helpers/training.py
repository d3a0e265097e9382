"""Training in-process: a bare trainer for step-level tests, and a real tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from pbe_lightning.train import train
from tests.helpers.config import compose_config


def bare_trainer(max_steps: int) -> L.Trainer:
    """A plain CPU Trainer with no logging, checkpoints or validation: for step-level tests."""
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def train_tiny_checkpoint(root: Path, cache: Path) -> Path:
    """One optimiser step, no validation: a real train.py checkpoint in about a second."""
    overrides = ["trainer.max_steps=1", "+trainer.limit_val_batches=0"]
    overrides += ["callbacks.checkpoint.every_n_train_steps=1", "~callbacks.sample_images"]
    train(compose_config(root, cache, *overrides))
    return root / "checkpoints" / "last.ckpt"
