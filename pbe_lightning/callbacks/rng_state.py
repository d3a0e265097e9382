"""Torch's, NumPy's and Python's global generators: seeded per rank, saved per rank.

The contract: none of the training step's draws come from the global generators. Masks,
augmentation, CFG dropout, noise and timesteps use the batch's own generators
(``pbe_lightning/batch_seeds.py``), which need no saved state. The global generators are left
to code that is not ours (a dropout layer in a swapped-in model, a third-party op), and this
callback makes those draws behave like ours:

- per rank: at the start of training each rank seeds them from (seed, rank). ``seed_everything``
  seeded every rank alike before, which the model's initialisation needs (and DDP also
  broadcasts rank 0's weights when it wraps the model), but draws during training must differ;
- resumable: every rank's states are gathered into the checkpoint (Lightning writes callback
  state from rank 0 only, which would hand rank 0's states to every rank) and each rank gets
  its own back right before the first resumed batch.
"""

from __future__ import annotations

import random
import warnings

import lightning as L
import numpy as np
import torch

from pbe_lightning.batch_seeds import derived_seed

FORMAT = 2  # 1 (no "format" key): rank 0's states only


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


def seed_global_generators(seed: int) -> None:
    """Python's, NumPy's and torch's (CPU and every CUDA device) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather_from_ranks(state: dict, trainer: L.Trainer) -> list[dict]:
    """Every rank's ``state``, in rank order (a collective: every rank saves checkpoints)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [state]
    states: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(states, state)
    return states


class RngState(L.Callback):
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._trainer: L.Trainer | None = None
        self._saved: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        states = [capture_rng()]
        if self._trainer is not None:
            states = gather_from_ranks(states[0], self._trainer)
        return {"format": FORMAT, "ranks": states}

    def load_state_dict(self, state: dict) -> None:
        self._saved = state

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, after setup, checkpoint loading and sanity validation: right before the first
        # batch, so nothing that runs before training shifts the states.
        saved, self._saved = self._saved, None
        if saved is None:
            seed_global_generators(derived_seed("global", self.seed, trainer.global_rank))
        elif saved.get("format") != FORMAT:
            restore_rng(saved["rank_state"])  # an older checkpoint: what it could restore
        elif len(saved["ranks"]) == trainer.world_size:
            restore_rng(saved["ranks"][trainer.global_rank])
        else:
            warnings.warn(
                f"the checkpoint holds the random states of {len(saved['ranks'])} ranks, this "
                f"run has {trainer.world_size}: the global generators are seeded afresh "
                "(training continues, but not bit for bit as the original run would have)",
                stacklevel=2,
            )
            step = trainer.global_step
            seed_global_generators(derived_seed("global", self.seed, trainer.global_rank, step))
