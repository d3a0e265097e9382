"""A checkpoint that does not fit on its disk: one line naming the disk, the folder and the fix.

torch's zip writer turns the operating system's "No space left on device" into its own
``RuntimeError`` ("unexpected pos ..."), and a quota into the same; Lightning then stops with a
traceback that names neither the disk nor the cure. ``checkpoints.save_atomically`` asks
:func:`out_of_space` about any failed write (while its temporary file still fills the disk) and
raises :class:`DiskFull` instead: a decided stop (``stops.py``) printed as one ``error:`` line.
The temporary file is removed, so the previous checkpoint stays as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

from pbe_lightning.stops import RunStopped

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# Less than this free while the failed write's temporary file is still there: the disk is full
# (a write stops within one block of the end; a quota within one allocation).
FULL_WITHIN_BYTES = 1 << 20


class DiskFull(RunStopped):
    """A checkpoint did not fit on its disk (or its quota)."""


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether a write into ``folder`` failed because its disk or quota is full."""
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return True
    try:
        return free_bytes(folder) < FULL_WITHIN_BYTES
    except OSError:
        return False


def mount_point(path: Path) -> Path:
    """The mount the path lives on: what ``df`` names, what a user frees or enlarges."""
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a checkpoint: about its size on disk."""
    if hasattr(value, "untyped_storage") and hasattr(value, "element_size"):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def megabytes(count: int) -> str:
    return f"{count / (1 << 20):.1f} MB"


def disk_full(path: Path, checkpoint: dict, kept: bool) -> DiskFull:
    """The stop for ``path`` not fitting (call after its temporary file is removed)."""
    folder = path.parent
    mount = mount_point(folder)
    previous = f"the previous {path.name} is kept" if kept else f"no {path.name} was written"
    return DiskFull(
        f"no space left on {mount} (disk or quota) for {path}: the checkpoint needs about "
        f"{megabytes(tensor_bytes(checkpoint))}, {megabytes(free_bytes(folder))} are free "
        f"there; {previous}. Free space on {mount} (or keep fewer periodic checkpoints: "
        "callbacks.checkpoint.save_top_k), or move the run folder to a larger disk and pass "
        "hydra.run.dir=<its new place>; then rerun with ckpt_path=last to resume"
    )
