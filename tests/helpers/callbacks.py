"""Test-only components a config can point at (``+callbacks.x._target_=tests.helpers.X``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class BatchCounter(L.Callback):
    """Writes how many training batches this rank saw to ``{dirpath}/batches_rank{r}.json``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.count += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "batches": self.count,
        }
        (self.dirpath / f"batches_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class SignalAt(L.Callback):
    """Sends this process ``signal`` when training reaches ``step`` (a test's preemption)."""

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        self.step = step
        self.signal = signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os
        import signal as signals

        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signals, self.signal))


class Pace(L.Callback):
    """Makes each training step last at least ``seconds`` and writes the step reached to
    ``{dirpath}/step``: a test can then signal the run from outside at a chosen step, the
    way a scheduler would, without touching the weights."""

    def __init__(self, dirpath: str, seconds: float = 0.2) -> None:
        self.path = Path(dirpath) / "step"
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(str(trainer.global_step))


class Ballast(L.Callback):
    """Adds ``megabytes`` of incompressible state to every checkpoint, so that a write takes
    long enough for a test to kill the process in the middle of it (as a big model's does)."""

    def __init__(self, megabytes: int) -> None:
        import torch

        generator = torch.Generator().manual_seed(0)
        self.ballast = torch.randint(
            0, 256, (megabytes << 20,), dtype=torch.uint8, generator=generator
        )

    def state_dict(self) -> dict:
        return {"ballast": self.ballast}

    def load_state_dict(self, state: dict) -> None:
        pass


class HangAt(L.Callback):
    """At ``step``, the step in flight never finishes (a hung collective, as far as the
    process can tell): signals are handled, but the step does not return. Writes
    ``{dirpath}/hanging`` once it hangs."""

    def __init__(self, step: int, dirpath: str) -> None:
        self.step = step
        self.marker = Path(dirpath) / "hanging"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        if trainer.global_step == self.step:
            self.marker.touch()
        while trainer.global_step == self.step:
            time.sleep(1)


class SyncCounter(L.Callback):
    """Counts, step by step, what would make the host wait for the accelerator: reads of
    tensor values (``item``, ``bool(t)``, ``cpu``, ...) and collectives on the training
    process group. Writes ``{dirpath}/syncs_rank{r}.json``: per step, whether it was a
    logging step and where each call came from. On a CPU run every read is counted, device
    or not, so a step that reads nothing here reads nothing on a GPU either.

    A step's window runs from its ``on_train_batch_start`` to the next one: the step, every
    hook after it, then fetching and transferring the next batch.
    """

    READS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")
    COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier")

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.steps: list[dict] = []
        self.originals: list[tuple[object, str, object]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        import torch
        import torch.distributed as dist

        for name in self.READS:
            self._wrap(torch.Tensor, name, f"Tensor.{name}")
        for name in self.COLLECTIVES:
            self._wrap(dist, name, f"dist.{name}", default_group_only=True)
        for name in ("reduce", "reduce_boolean_decision", "broadcast", "barrier", "all_gather"):
            self._wrap(trainer.strategy, name, f"strategy.{name}")

    def _wrap(self, owner, name: str, label: str, default_group_only: bool = False) -> None:
        import traceback

        original = getattr(owner, name)
        counter = self

        def counted(*args, **kwargs):
            side_group = kwargs.get("group") is not None  # our CPU side group: no device sync
            if counter.steps and not (default_group_only and side_group):
                frames = [
                    f"{f.filename.split('/')[-1]}:{f.lineno}"
                    for f in traceback.extract_stack()[:-1]
                    if "site-packages/torch/" not in f.filename
                ]
                where = " < ".join(reversed(frames[-4:]))
                counter.steps[-1]["calls"].append(f"{label} at {where}")
            return original(*args, **kwargs)

        self.originals.append((owner, name, original))
        setattr(owner, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from pbe_lightning.logging_steps import is_logging_step

        logging = is_logging_step(trainer)  # read before the counting window opens
        self.steps.append({"step": trainer.global_step, "logging": logging, "calls": []})

    def on_train_end(self, trainer, pl_module) -> None:
        for owner, name, original in reversed(self.originals):
            setattr(owner, name, original)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"syncs_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps, indent=1))
