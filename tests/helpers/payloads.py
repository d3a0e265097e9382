"""Checkpoints tampered with as an attacker would: a real file plus one object whose unpickling
runs code (it creates a marker file), or a harmless non-plain object a user might trust."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from tests.helpers.hostile_corpus import TouchOnUnpickle


def with_payload(source: Path, out: Path, marker: Path) -> Path:
    """``source`` re-saved with an extra entry that creates ``marker`` when unpickled."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["payload"] = TouchOnUnpickle(marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def with_omegaconf(source: Path, out: Path) -> Path:
    """``source`` re-saved with an omegaconf container (as some trainers store hparams): no
    payload, but more than ``weights_only`` loads; a user may trust such a file."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["hparams"] = OmegaConf.create({"lr": 1e-5})
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out
