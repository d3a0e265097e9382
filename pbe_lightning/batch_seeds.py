"""The seeds of a training batch's random draws: its own on every rank, for every batch.

Every training batch carries a :class:`BatchSeeds` under ``batch["seeds"]``: the data seed, the
global rank and the batch's index in this rank's stream (``StreamState.index``). Each random
draw made for the batch takes an explicit generator seeded from those three and the draw's
purpose: the mask shapes, scene flip and reference augmentation (in the DataModule's device
hook), the CFG dropout, VAE posterior sample, noise and timesteps (in the training step). So:

- every rank, and every batch of a rank (gradient-accumulation micro-batches included), draws
  differently. ``seed_everything`` gives every rank the same global generator state, which
  made all GPUs draw the same timesteps and noise: eight GPUs gave one GPU's worth of draws;
- a resumed run draws exactly what the uninterrupted run drew: the batch index resumes with the
  data stream (the DataModule's checkpoint state), so no generator state needs saving, and no
  draw depends on the order in which hooks run or on how many values another kind of draw took;
- each purpose has a stream of its own: an ablation that changes one kind of draw (say, the
  augmentation) leaves the others (noise, timesteps) as they were, so the variants of a sweep
  are compared on the same noise;
- seeding is host work: a CUDA generator keeps its seed and offset on the host, so this adds
  no host-device sync to a step.

Draws made by code that uses torch's global generators (none of ours in training) are kept
per rank and resumable by ``pbe_lightning.callbacks.rng_state``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

SEEDS_KEY = "seeds"  # where a training batch carries its BatchSeeds
# Each kind of draw has its own stream; a name outside this list is a programming error.
PURPOSES = ("mask", "scene", "reference", "cfg_dropout", "diffusion")


@dataclass(frozen=True)
class BatchSeeds:
    """Host-side integers, so a batch carries them without any device transfer."""

    seed: int
    rank: int
    index: int

    def seed_for(self, purpose: str) -> int:
        """A 64-bit seed for ``purpose``, hashed from (seed, rank, index, purpose)."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown draw purpose {purpose!r}: one of {', '.join(PURPOSES)}")
        return derived_seed(self.seed, self.rank, self.index, purpose)

    def generator(self, purpose: str, device: torch.device | str) -> torch.Generator:
        """A fresh generator on ``device`` (CUDA tensors need a CUDA generator). CUDA's Philox
        generator uses all 64 bits of the seed; the CPU's Mersenne Twister only the low 32."""
        return torch.Generator(device=device).manual_seed(self.seed_for(purpose))


def derived_seed(*parts: object) -> int:
    """A 64-bit seed hashed from ``parts``. A hash rather than arithmetic such as
    ``seed + rank * K + index``: neighbouring tuples must not share or overlap streams."""
    key = ":".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def batch_generator(
    batch: dict, purpose: str, device: torch.device | str
) -> torch.Generator | None:
    """The generator for ``purpose`` of a training batch; None for a batch without seeds
    (validation, tools, a DataModule of the user's own), which then draws from torch's global
    generators as plain PyTorch code does."""
    seeds: BatchSeeds | None = batch.get(SEEDS_KEY)
    return None if seeds is None else seeds.generator(purpose, device)
