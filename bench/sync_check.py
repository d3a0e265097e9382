"""Host-device synchronisations per training step, counted by CUDA itself (GPU only).

    python -m bench.sync_check                      # the demo on the GPU, ~1 min
    python -m bench.sync_check trainer.max_steps=60 data.batch_size=32

Trains the demo through ``train.py``'s trainer on ``trainer=gpu`` with
``torch.cuda.set_sync_debug_mode("warn")`` switched on from the start of each step that is
not a logging step to the start of the next one (the step, its hooks, fetching and moving
the next batch). Every synchronising CUDA call warns; the warnings are counted per step and
their call sites listed. Logging steps may read values back: that is when Lightning flushes
metrics. Last line: ``host syncs between logging steps: <N> in <S> steps``.
"""

from __future__ import annotations

import argparse
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import pbe_lightning.utils.resolvers  # noqa: F401  (the config's own resolvers)
from pbe_lightning.logging_steps import is_logging_step
from pbe_lightning.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"


class SyncDebug(L.Callback):
    def __init__(self) -> None:
        self.syncs: Counter[str] = Counter()
        self.quiet_steps = 0
        self._context: warnings.catch_warnings | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close()
        if trainer.global_step < 3 or is_logging_step(trainer):  # warm-up and logging steps
            return
        self.quiet_steps += 1
        self._context = warnings.catch_warnings()  # restores filters and showwarning after
        self._context.__enter__()
        warnings.filterwarnings("always", message=".*synchroniz")
        self._show = warnings.showwarning
        warnings.showwarning = self._note
        torch.cuda.set_sync_debug_mode("warn")

    def _note(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            self._show(message, category, filename, lineno, file, line)
            return
        stack = traceback.extract_stack()[:-1]
        frames = [f for f in stack if "/torch/" not in f.filename and "warnings" not in f.filename]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])
        self.syncs[where] += 1

    def _close(self) -> None:
        if self._context is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._context.__exit__(None, None, None)
        self._context = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()
        for where, count in self.syncs.most_common(10):
            print(f"{count:5d}  {where}")
        total = sum(self.syncs.values())
        print(f"host syncs between logging steps: {total} in {self.quiet_steps} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.sync_check needs a CUDA GPU: CPU runs cannot observe syncs")
    overrides = [
        "trainer=gpu",
        "logger=csv",
        "trainer.max_steps=40",
        "trainer.log_every_n_steps=10",
        "+callbacks.sync_debug._target_=bench.sync_check.SyncDebug",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *args.overrides])
    with tempfile.TemporaryDirectory() as output_dir:
        with open_dict(cfg):
            cfg.paths.output_dir = output_dir
        train(cfg)  # SyncDebug prints its count when training ends


if __name__ == "__main__":
    main()
