"""Generated cache folders (demo data, tiny models): written once, atomically."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

COMPLETE = ".complete"


def generate_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` and rename tmp to ``folder``, unless ``folder`` is already complete.

    The rename makes concurrent DDP ranks or an interrupted run unable to leave a half-written
    folder behind; a rank that loses the race drops its own (identical) copy.
    """
    folder = Path(folder)
    if (folder / COMPLETE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # Seeded generation must not move the caller's RNG: a run that generates the cache and
    # one that finds it must train identically.
    with torch.random.fork_rng():
        write(tmp)
    (tmp / COMPLETE).touch()
    try:
        tmp.rename(folder)
    except OSError:  # another rank finished first with identical content
        shutil.rmtree(tmp, ignore_errors=True)
    if not (folder / COMPLETE).is_file():
        raise RuntimeError(f"{folder} exists but is incomplete: delete it and run again")
    return folder
