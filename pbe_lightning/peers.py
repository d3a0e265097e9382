"""Which ranks still answer: a heartbeat per rank in the job's TCP store, read on a signal.

When one rank of a job dies (``kill -9``, the OOM killer, a lost node), the others block in
their next collective: NCCL waits for its timeout (10 min), and a rank blocked in C++ never runs
a Python signal handler. torchrun then sends SIGTERM to the survivors before it restarts the
group, and SIGKILL 30 s later; a scheduler does the same with its own grace time. A survivor
cannot finish its step nor save (saving takes collectives too), so it should leave at once.
Telling "a peer is gone" from "the scheduler stops us all" needs the peers themselves: every
rank bumps its counter in the store that the ranks already share (torchrun's agent, or rank 0
under Lightning's own launcher) every ``BEAT_S``, from a thread that C++ calls do not block;
on a shutdown signal ``shutdown.py`` asks :meth:`Heartbeat.silent` which counters stand still.

Lightning and torch offer no such check: torch's process-group timeouts (and NCCL's watchdog)
fire minutes later, and the elastic agent's own health checks live in the agent, not the ranks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

import lightning as L

from pbe_lightning.shutdown import SHUTDOWN, STORE_WAIT_S

log = logging.getLogger(__name__)

BEAT_S = 0.5


def attempt() -> str:
    """This start of the job: a restarted torchrun group (or requeued SLURM job) beats anew."""
    return (
        os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or "0"
    )


class Heartbeat:
    """This rank's beat, and the others' silence, in the job's TCP store."""

    def __init__(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.address = (host, port)
        self.rank, self.world_size = rank, world_size
        self.prefix = f"pbe/heartbeat/{attempt()}/"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="peer-heartbeat", daemon=True)

    def _client(self):
        from torch.distributed import TCPStore

        host, port = self.address
        return TCPStore(
            host,
            port,
            is_master=False,
            timeout=timedelta(seconds=STORE_WAIT_S),
            wait_for_workers=False,
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _beat(self) -> None:
        try:
            store = self._client()
            while not self.stopped.is_set():
                store.add(f"{self.prefix}{self.rank}", 1)
                self.stopped.wait(BEAT_S)
        except Exception as error:  # the store is gone: the job is ending anyway
            log.debug("peer heartbeat stopped: %s", error)

    def silent(self, within_s: float) -> list[str]:
        """The peers whose beat stands still for ``within_s`` (a few seconds; returns as soon
        as every peer has beaten). Peers that never beat yet (still starting) are not judged."""
        try:
            store = self._client()
            others = [r for r in range(self.world_size) if r != self.rank]
            first = {r: store.add(f"{self.prefix}{r}", 0) for r in others}
            waiting = {r for r, count in first.items() if count > 0}
            deadline = time.monotonic() + within_s
            while waiting and time.monotonic() < deadline:
                time.sleep(0.1)
                waiting = {r for r in waiting if store.add(f"{self.prefix}{r}", 0) == first[r]}
        except Exception as error:  # refused, reset, timed out: whoever served it is gone
            return [f"the job's TCP store at {self.address[0]}:{self.address[1]} ({error})"]
        return [f"rank {r}" for r in sorted(waiting)]


class PeerWatch(L.Callback):
    """While a multi-rank fit runs: beat, and let a shutdown signal ask who is gone.

    Added by ``train.make_trainer`` (not a config choice: it costs one store write per rank
    every ``BEAT_S``, and only a signal reads the others')."""

    def __init__(self) -> None:
        self.heartbeat: Heartbeat | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size < 2 or self.heartbeat is not None:
            return
        environment = trainer.strategy.cluster_environment
        self.heartbeat = Heartbeat(
            environment.main_address,
            environment.main_port,
            trainer.global_rank,
            trainer.world_size,
        )
        self.heartbeat.start()
        SHUTDOWN.peers_gone = self.heartbeat.silent

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A collective fails at once when a peer's sockets close (gloo): whether a peer died
        # is decided (and said in one line, exit 3) before Lightning's teardown and traceback.
        if self.heartbeat is not None:
            SHUTDOWN.check_peers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.heartbeat is not None:
            SHUTDOWN.peers_gone = None
            self.heartbeat.stop()
            self.heartbeat = None
