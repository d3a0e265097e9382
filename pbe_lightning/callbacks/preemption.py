"""Preemption: on a shutdown signal, save ``last.ckpt`` at the step boundary and stop.

The signals themselves are caught by ``pbe_lightning.shutdown`` (any process, any moment);
this callback decides *when* to act: after the step in flight (never mid-update), on every
rank at the same step, then ``last.ckpt`` and a clean stop, so ``ckpt_path=last`` continues
exactly. Ranks agree through ``StepVote``, which never touches the accelerator. If the signal was the SLURM requeue signal, the job is
requeued once everything is written (see ``train.py``).

Lightning's SLURM handler saves ``hpc_ckpt_*.ckpt`` from inside the signal handler, mid-step,
and requeues before the loggers close; its SIGTERM handler kills DDP children from the
handler. This callback replaces both (``train.py`` turns Lightning's auto-requeue off).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from pbe_lightning.shutdown import SHUTDOWN, StalledShutdown, kill_loader_workers

log = logging.getLogger(__name__)


class StepVote:
    """Whether any rank was signalled, agreed by all ranks at the same step with no device
    sync: each step starts an asynchronous all-reduce of this rank's flag on a CPU (gloo)
    group and reads the one started a step earlier, which has long finished by then.

    All ranks therefore stop at the same step, one step after the first of them saw the
    signal. A per-step ``reduce_boolean_decision`` (Lightning's) runs on the training
    backend: on NCCL its result must be copied back from the GPU, a sync every step.
    """

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")
        self.pending: tuple[dist.Work, np.ndarray] | None = None

    def __call__(self, local: bool) -> bool:
        agreed = self.wait()
        flag = np.array([int(local)], dtype=np.int32)  # host memory, shared with the tensor
        work = dist.all_reduce(
            torch.from_numpy(flag), op=dist.ReduceOp.MAX, group=self.group, async_op=True
        )
        self.pending = (work, flag)
        return agreed

    def wait(self) -> bool:
        if self.pending is None:
            return False
        work, flag = self.pending
        work.wait()
        self.pending = None
        return bool(flag[0])


class Preemption(L.Callback):
    def __init__(
        self, dirpath: str, grace_period_s: float = 60.0, requeue_signal: str = "SIGUSR2"
    ) -> None:
        self.vote: StepVote | None = None
        self.dirpath = Path(dirpath)
        self.grace_period_s = grace_period_s
        self.requeue_signal = signal.Signals[requeue_signal].name  # fails early on a typo

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        SHUTDOWN.grace_period_s = self.grace_period_s
        SHUTDOWN.install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its own SIGTERM handler just before this hook: take them back.
        SHUTDOWN.install()
        SHUTDOWN.waiting_for_data = True
        self.vote = StepVote() if trainer.world_size > 1 else None
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
            # Lightning broadcasts "did rank 0 get SIGTERM?" from the device and reads it
            # back every step (a sync per step). The signals are ours: its flag never rises.
            epoch_loop._broadcast_sigterm_tensor = lambda: None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.vote is not None:
            self.vote.wait()  # every rank started the same last vote: finish it everywhere

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        SHUTDOWN.waiting_for_data = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = SHUTDOWN.requested if self.vote is None else self.vote(SHUTDOWN.requested)
        if requested:
            self._save_and_stop(trainer)
        else:
            SHUTDOWN.waiting_for_data = True

    def on_validation_start(self, trainer, pl_module) -> None:
        SHUTDOWN.waiting_for_data = False

    def on_validation_end(self, trainer, pl_module) -> None:
        # Within fit, the next thing after validation is the next training batch.
        SHUTDOWN.waiting_for_data = not trainer.sanity_checking

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # The main thread waited for data past the grace period: the model and the stream
        # position are those of the last completed step. With several ranks the others sit
        # in a collective we cannot join, so only a single process saves here.
        if isinstance(exception, StalledShutdown) and trainer.world_size == 1:
            self._save_and_stop(trainer)
            # Lightning's teardown would wait on the stuck reader: close up and leave now.
            kill_loader_workers()
            SHUTDOWN.exit_now(0)

    def _save_and_stop(self, trainer: L.Trainer) -> None:
        SHUTDOWN.waiting_for_data = False
        name = trainer.strategy.broadcast(SHUTDOWN.signal_name or "a signal on another rank")
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        SHUTDOWN.saved = True
        SHUTDOWN.requeue_wanted = name == self.requeue_signal and "SLURM_JOB_ID" in os.environ
        SHUTDOWN.finished.set()
        then = "requeueing the job" if SHUTDOWN.requeue_wanted else "stopping"
        log.warning("%s: saved %s at step %d, %s", name, path, trainer.global_step, then)
