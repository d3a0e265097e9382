"""Real small filesystems for fault tests: a tmpfs mounted for the test, filled as a disk fills."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_filesystem(folder: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of ``megabytes`` mounted at ``folder`` for the test (needs root and a kernel
    that lets this container mount); the test is skipped, saying why, where it cannot."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Another process fills the filesystem of ``folder`` until ``leave_bytes`` remain free;
    returns its file (delete it to free the space again)."""
    filler = folder / "filler.bin"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as file:
        while (room := shutil.disk_usage(folder).free - leave_bytes) > 0:
            file.write(chunk[: min(room, len(chunk))])
            file.flush()
    return filler
