"""Checkpoint files you can trust: atomic writes, a readable one to resume from, same model.

Lightning's ``_atomic_save`` serialises into memory, then writes through an fsspec
transaction whose temp file lives in ``$TMPDIR``; when that is another filesystem than the
run folder (node-local /tmp or tmpfs vs shared storage) the final "move" is a copy that
truncates ``last.ckpt`` first, nothing is fsynced, and a kill there leaves a 0-byte
``last.ckpt``. ``AtomicCheckpointIO`` writes the temp file next to the final path and renames
it, so a reader sees the old file or the new one, never half of one.

Reading: every checkpoint read here, and Lightning's own resume load (``AtomicCheckpointIO``),
goes through ``safe_load.load_checkpoint``: tensors and plain values only, or a one-line refusal
before anything in the file runs. What train.py writes loads that way (tested per kind).
"""

from __future__ import annotations

import logging
import os
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pbe_lightning.disk_full import disk_full, out_of_space
from pbe_lightning.safe_load import load_checkpoint
from pbe_lightning.shutdown import SHUTDOWN
from pbe_lightning.stops import RunStopped

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"  # .last.ckpt.tmp-<pid>: hidden, and never matched by *.ckpt
_writing: set[Path] = set()  # temp files in progress, removed on a hard exit


def _remove_unfinished_writes() -> None:
    for temp in list(_writing):
        temp.unlink(missing_ok=True)


SHUTDOWN.on_exit.append(_remove_unfinished_writes)


def fsync_folder(folder: Path) -> None:
    """Make a rename durable: the folder entry, not only the file's bytes."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, rename over ``path``, fsync.

    A full disk or quota raises ``DiskFull`` (one line: the disk, the fix); the temp file is
    removed and ``path`` keeps its previous content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    _writing.add(temp)
    # A long write is not a data stall: the grace timer must not interrupt it.
    waiting, SHUTDOWN.waiting_for_data = SHUTDOWN.waiting_for_data, False
    try:
        with open(temp, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
        fsync_folder(path.parent)
    except Exception as error:
        if not out_of_space(error, path.parent):  # asked while the temp file still fills it
            raise
        kept = path.exists()
        temp.unlink(missing_ok=True)
        raise disk_full(path, checkpoint, kept) from error
    finally:
        temp.unlink(missing_ok=True)
        _writing.discard(temp)
        SHUTDOWN.waiting_for_data = waiting


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes (object stores keep fsspec's put,
    which is atomic there: an object appears whole or not at all), and safe reads.

    Lightning 2.6 resumes with ``torch.load(weights_only=None)``: torch's default, which
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns into ``weights_only=False``. Here a local
    resume is read by ``load_checkpoint``: weights only, unless the user trusts the file.
    """

    def load_checkpoint(
        self, path: str | Path, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):  # an object store: Lightning's reader, weights only
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint(path, map_location=map_location)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        save_atomically(checkpoint, Path(path))


def remove_stale_writes(folder: Path) -> list[Path]:
    """Temp files of writes that a killed process never finished (call before training)."""
    stale = sorted(folder.glob(f".*{TEMP_MARK}*")) if folder.is_dir() else []
    for temp in stale:
        with suppress(FileNotFoundError):
            temp.unlink()
    if stale:
        log.warning("removed %d unfinished checkpoint write(s) in %s", len(stale), folder)
    return stale


def unreadable_reason(path: Path) -> str | None:
    """None if ``path`` opens as a checkpoint, else why not (cheap: mmap, no tensor reads)."""
    try:
        if path.stat().st_size == 0:
            return "0 bytes (a write that never finished)"
        checkpoint = load_checkpoint(path, mmap=True)
    except RunStopped:  # a file that would run code is refused, never skipped for an older one
        raise
    except Exception as error:  # zip, pickle and OS errors all mean "cannot resume from it"
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "not a Lightning checkpoint (no state_dict)"
    return None


class NoReadableCheckpoint(RunStopped):
    pass


def newest_readable(folder: Path) -> Path | None:
    """``last.ckpt`` if it reads, else the newest readable ``*.ckpt`` (with a warning);
    None for a folder with no checkpoints; an error naming each file if none reads."""
    last = folder / "last.ckpt"
    others = sorted(
        (p for p in folder.glob("*.ckpt") if p != last), key=lambda p: p.stat().st_mtime
    )
    candidates = ([last] if last.exists() else []) + others[::-1]
    problems: list[str] = []
    for path in candidates:
        reason = unreadable_reason(path)
        if reason is None:
            if problems:
                log.warning(
                    "ckpt_path=last: skipped unreadable %s; resuming from %s",
                    "; ".join(problems),
                    path,
                )
            return path
        problems.append(f"{path.name} ({reason})")
    if problems:
        raise NoReadableCheckpoint(
            f"ckpt_path=last: no checkpoint in {folder} can be read: "
            + "; ".join(problems)
            + ". Move them away to restart this run from scratch, or pass "
            "ckpt_path=/path/to/a/good.ckpt"
        )
    return None


def architecture_differences(saved: dict, current: dict) -> list[str]:
    """``key: checkpoint X, now Y`` for every architecture key that differs."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]


def saved_architecture(path: Path) -> dict | None:
    """The architecture ``path`` was trained with (cheap: memory-mapped); None for checkpoints
    from before it was recorded. Read before the model is built, so that a checkpoint that
    would run code is refused at once."""
    checkpoint = load_checkpoint(path, mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise RunStopped(
            f"cannot resume {path}: not a Lightning checkpoint written by train.py (no "
            "state_dict); pass another ckpt_path"
        )
    return checkpoint.get("pbe_architecture")


def check_same_architecture(
    path: Path, saved: dict | None, current: dict, allow_change: bool
) -> None:
    """Stop before training when ``path`` was trained (``saved``) with another architecture.

    Same-shaped weights (``bottleneck=cls`` vs ``tokens``) would otherwise load and train,
    silently wrong; differently shaped ones fail late with a long state-dict error.
    """
    if saved is None:
        log.warning("%s records no architecture (an older checkpoint): not checked", path)
        return
    differences = architecture_differences(saved, current)
    if not differences:
        return
    if allow_change:
        log.warning("resuming %s with a different architecture: %s", path, "; ".join(differences))
        return
    raise RunStopped(
        f"cannot resume {path}: it was trained with another architecture ("
        + "; ".join(differences)
        + "). Restore those settings to continue that run, use a new run folder for a new "
        "model, or add allow_architecture_change=true if the change is intended"
    )
