"""Test-only failures a config can switch on (``+callbacks.x._target_=tests.helpers.faults.X``),
and a hold to deliver one from outside at an exact step."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class FailAt(L.Callback):
    """Raises an error (a bug, a lost file system, ...) when training reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"a test failure at step {self.step}")


class HoldAt(L.Callback):
    """Before the batch of ``step`` (every checkpoint of the steps before it written), writes
    ``{dirpath}/held`` and waits until ``{dirpath}/go`` exists: the test breaks something at
    exactly that point (fills the disk, ...), however slow the machine, then lets it go on."""

    def __init__(self, step: int, dirpath: str) -> None:
        self.step = step
        self.dirpath = Path(dirpath)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        (self.dirpath / "held").touch()
        while not (self.dirpath / "go").exists():
            time.sleep(0.02)


def hold_at(step: int, dirpath: Path) -> list[str]:
    """The overrides that switch :class:`HoldAt` on."""
    dirpath.mkdir(parents=True, exist_ok=True)
    return [
        "+callbacks.hold._target_=tests.helpers.faults.HoldAt",
        f"+callbacks.hold.step={step}",
        f"+callbacks.hold.dirpath={dirpath}",
    ]


def wait_until_held(process, dirpath: Path, timeout: float = 240) -> None:
    """Until the run holds (``HoldAt``); fails if it ends or never gets there."""
    deadline = time.monotonic() + timeout
    while not (dirpath / "held").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the run never held (exit code {process.poll()})")
        time.sleep(0.02)


def let_go(dirpath: Path) -> None:
    (dirpath / "go").touch()
