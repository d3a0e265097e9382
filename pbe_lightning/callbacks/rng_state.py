"""Saves the global RNG states in checkpoints and restores them on resume.

Noise, timesteps, CFG dropout, masks and augmentation all draw from the global generators;
with them restored (and the data stream position, saved by the DataModule) a resumed run
takes exactly the steps the uninterrupted run would have.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


def capture_rng() -> dict:
    # Plain tuples and tensors only: Lightning loads checkpoints with torch's weights_only.
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RngState(L.Callback):
    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return {"rank_state": capture_rng()}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state["rank_state"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Applied here, after sanity validation and setup, right before the first batch.
        if self._pending is not None:
            restore_rng(self._pending)
            self._pending = None
