"""Checkpoint and weight files read without running code from them.

A ``.ckpt``/``.pt``/``.bin`` file is a pickle, and unpickling can import and call anything
the file names: a tampered checkpoint (a shared W&B artifact, a download) runs its payload
the moment ``torch.load(weights_only=False)`` opens it. Every read of a checkpoint or weight
file in pbe-lightning goes through :func:`load_checkpoint`: ``torch.load(weights_only=True)``,
which loads tensors, plain containers and numbers only, or refuses the file with one line
naming it and the type it holds (:class:`UnsafeCheckpoint`), before anything in it runs.
``.safetensors`` files hold tensors only and are read with safetensors.

Files the user trusts: the entry points register them with :func:`trusted_files`
(``trust_checkpoint=true`` in train.py / evaluate.py, ``--trust-checkpoint`` in edit / export):
the checkpoint to load (for ``ckpt_path=last``: the run's checkpoints folder) and
``model.init_from``. Those alone load with ``weights_only=False``, which CAN run code from the
file. torch's own ``torch.serialization.safe_globals`` would let a chosen class through for every
file; this is per file, and it names the refused type in the message.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pbe_lightning.stops import RunStopped

log = logging.getLogger(__name__)

WEIGHT_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")  # single-file weights
TRUST_FIX = (
    "if you trust where it came from, add trust_checkpoint=true (train.py, evaluate.py) or "
    "--trust-checkpoint (edit, export), which lets it run code; else use a clean copy"
)
RESAVE_FIX = (
    "if you trust where it came from, re-save its tensors as .safetensors and pass that file; "
    "else use a clean copy"
)

_trusted: list[Path] = []  # files and folders whose checkpoints the user trusts


class UnsafeCheckpoint(RunStopped):
    """A checkpoint or weight file holding more than tensors and plain values: refused."""


@contextmanager
def trusted_files(*paths: str | Path | None) -> Iterator[None]:
    """Within the block, these files (and every file under these folders) load with
    ``weights_only=False``. ``None`` entries are ignored."""
    added = [Path(p).expanduser().resolve() for p in paths if p]
    _trusted.extend(added)
    try:
        yield
    finally:
        for path in added:
            _trusted.remove(path)


def is_trusted(path: str | Path) -> bool:
    resolved = Path(path).expanduser().resolve()
    return any(resolved == t or t in resolved.parents for t in _trusted)


def refused_type(error: Exception) -> str | None:
    """The global torch's weights-only unpickler refused (``GLOBAL posix.system``), if any."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def is_refusal(error: Exception) -> bool:
    """A weights-only refusal, not a corrupt file (``invalid load key``, a cut-short zip)."""
    return isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)


def refusal_message(path: str | Path, error: Exception, fix: str) -> str:
    held = refused_type(error)
    what = f"a pickled {held}" if held else "something besides tensors and plain values"
    return (
        f"refused to load {path}: it holds {what}, and loading it would run code from the file "
        f"(torch.load weights_only=True): {fix}"
    )


def load_checkpoint(
    path: str | Path,
    map_location: Any = "cpu",
    mmap: bool = False,
    fix: str = TRUST_FIX,
) -> Any:
    """``torch.load(path, weights_only=True)``; :class:`UnsafeCheckpoint` (one line naming the
    file, the type it holds and ``fix``) for a file holding anything more, unless the user
    trusts it (:func:`trusted_files`). ``mmap``: tensors stay on disk until used."""
    if is_trusted(path):
        log.warning("loading %s with weights_only=False: trusted by the user", path)
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        if is_refusal(error):
            raise UnsafeCheckpoint(refusal_message(path, error, fix)) from None
        raise


def check_loadable(path: str | Path, fix: str = RESAVE_FIX) -> None:
    """Refuse ``path`` now, cheaply, if :func:`load_checkpoint` would: for files a library then
    reads itself (open_clip). Memory-mapped, so tensors are not read (legacy non-zip files,
    which cannot be mapped, are read whole). ``.safetensors`` cannot hold code."""
    if Path(path).suffix == ".safetensors" or is_trusted(path):
        return
    try:
        load_checkpoint(path, mmap=True, fix=fix)
    except RuntimeError as error:
        if isinstance(error, RunStopped) or "mmap" not in str(error):
            raise
        load_checkpoint(path, fix=fix)


def read_tensors(path: str | Path, fix: str = RESAVE_FIX) -> dict[str, torch.Tensor]:
    """A weight file's tensors: ``.safetensors``, or a torch file (its ``state_dict`` entry if
    it has one), loaded as :func:`load_checkpoint` does."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    checkpoint = load_checkpoint(path, fix=fix)
    return checkpoint.get("state_dict", checkpoint)


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint``, the command-line opt-in of ``trust_checkpoint=true`` (edit, export)."""
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that holds more than tensors (weights_only=False): it can run "
        "code from the file, so only for a file whose origin you trust",
    )
