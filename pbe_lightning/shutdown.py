"""Shutdown signals the way clusters deliver them: to every process, at any moment.

``scancel``, a SLURM time limit, ``timeout``, torchrun and Ctrl-C signal the whole process
group: the main process *and* its DataLoader workers. Lightning's own handler covers only
SIGTERM in the main process, kills the DDP children from inside the handler and runs a
collective there, and Python's default SIGINT raises ``KeyboardInterrupt`` wherever the main
thread happens to be. Neither can finish the step in flight and save it, nor survive a worker
that died of the same signal, nor give up on a step that can never finish. This module:

- records the first SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 in the main process (installed at
  import time of ``train.py``, so a signal during start-up is kept, not fatal); the training
  callback (``callbacks/preemption.py``) acts on it at the next step boundary;
- hears a signal at once even while the main thread is blocked in C++ (a collective, a read):
  Python runs its handlers only between bytecodes of the main thread, so a thread woken by
  ``signal.set_wakeup_fd`` takes the signal instead (:class:`SignalWatch`);
- with several ranks, asks whether every peer still answers (``peers.py``): when one is gone
  (``kill -9``, a lost node; torchrun then signals the survivors before restarting the group),
  the step in flight can never finish, so it exits at once with code 3, saving nothing;
- exits at once on a second, later signal (a person pressing Ctrl-C twice);
- arms a grace timer: if the step in flight cannot finish (stuck data, hung collective), the
  process either interrupts a main thread that is only waiting for data (the callback then
  saves the last completed step) or exits non-zero without touching any checkpoint;
- makes DataLoader workers (and only them) deaf to these signals, so they live until the
  main process has saved and shuts them down.

Only the standard library is imported at the top: ``train.py`` installs this before torch.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

log = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# torchrun forwards the SIGTERM its own process group already delivered: one request, not two.
DUPLICATE_WINDOW_S = 1.0
# A peer whose heartbeat stands still this long after a signal is gone (peers.py beats every
# 0.5 s; this leaves room for a busy machine, far below torchrun's 30 s before SIGKILL).
PEER_SILENCE_S = 3.0
STORE_WAIT_S = 5.0  # the most a store operation of the peer check may take
EXIT_STALLED = 3  # the step in flight could not finish within the grace period: nothing saved
EXIT_SECOND_SIGNAL = 4  # a second shutdown signal: exit now, nothing saved
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StalledShutdown(BaseException):
    """Raised in the main thread when a shutdown waited ``grace_period_s`` for data.

    A BaseException, so data pipelines that catch ``Exception`` per record or shard
    (webdataset's handlers, ours) do not swallow it.
    """


class SignalWatch:
    """A daemon thread that hears shutdown signals when they arrive, whatever the main thread
    does: CPython's C-level handler writes each signal's number to the wakeup fd at once; the
    Python-level handler would wait until the main thread returns from C++."""

    def __init__(self, on_signal: Callable[[int], None]) -> None:
        self.on_signal = on_signal
        self.pid = os.getpid()
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)  # the C handler must never block
        self.thread = threading.Thread(target=self._listen, name="shutdown-signals", daemon=True)
        self.thread.start()
        # A forked child (a loader worker) must not write its own signals into our socket.
        os.register_at_fork(after_in_child=self.forget)

    @property
    def fd(self) -> int:
        return self.writer.fileno()

    def _listen(self) -> None:
        wanted = {int(s) for s in SHUTDOWN_SIGNALS}
        while True:
            for signum in self.reader.recv(64):
                if signum in wanted:
                    self.on_signal(signum)

    def hears(self) -> bool:
        """Whether this thread heard the signal: the wakeup fd is ours (main thread only; puts
        ours back if someone replaced it). Never in a forked child: its thread did not fork."""
        if os.getpid() != self.pid:
            return False
        previous = signal.set_wakeup_fd(self.fd, warn_on_full_buffer=False)
        return previous == self.fd and self.thread.is_alive()

    @staticmethod
    def forget() -> None:
        with suppress(ValueError):  # not the main thread of a child: nothing was set there
            signal.set_wakeup_fd(-1)


class ShutdownRequest:
    """The process-wide record of shutdown signals, and what to do when a step hangs."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self.grace_period_s: float = 60.0
        self.waiting_for_data = False  # set by the training callback between steps
        self.saved = False  # last.ckpt holds the last completed step
        self.requeue_wanted = False  # the scheduler's requeue signal, and last.ckpt is saved
        self.finished = threading.Event()
        self.on_exit: list[Callable[[], None]] = []  # cleanups before any hard exit
        self.after_save: list[Callable[[], None]] = []  # before a hard exit with code 0
        # Several ranks: the peers that stopped answering, given how long to watch them
        # (set by peers.PeerWatch while training runs); None for a single process.
        self.peers_gone: Callable[[float], list[str]] | None = None
        self.watch: SignalWatch | None = None
        self.peer_check: threading.Thread | None = None
        self.lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self, signals: tuple[signal.Signals, ...] = SHUTDOWN_SIGNALS) -> dict:
        """Handle ``signals`` in this process (main thread only; a no-op elsewhere).

        Returns the handlers it replaced that were not already ours, for ``restore``.
        """
        if threading.current_thread() is not threading.main_thread():
            return {}
        replaced: dict = {}
        for signum in (*signals, signal.SIGALRM):
            handler = self._interrupt_data_wait if signum == signal.SIGALRM else self._handle
            previous = signal.signal(signum, handler)
            if getattr(previous, "__self__", None) is not self:
                replaced[signum] = previous
        if self.watch is None:
            self.watch = SignalWatch(self._received)
        previous_fd = signal.set_wakeup_fd(self.watch.fd, warn_on_full_buffer=False)
        if previous_fd != self.watch.fd:
            replaced["wakeup_fd"] = previous_fd
        return replaced

    def restore(self, handlers: dict) -> None:
        """Put back what ``install`` replaced (a caller that runs training in-process)."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                if signum == "wakeup_fd":
                    signal.set_wakeup_fd(handler)
                else:
                    signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def reset(self) -> None:
        """Forget a handled request (a multirun's next job starts clean)."""
        self.signal_name = self.received_at = None
        self.waiting_for_data = self.saved = self.requeue_wanted = False
        self.after_save = []
        self.finished = threading.Event()
        self.peer_check = None

    def _handle(self, signum: int, frame: object) -> None:
        """The Python-level handler: the signal watch has it already, unless someone replaced
        the wakeup fd (then it is handled here, once the main thread runs Python again)."""
        if self.watch is None or not self.watch.hears():
            self._received(signum)

    def _received(self, signum: int) -> None:
        with self.lock:
            self._decide(signum)

    def _decide(self, signum: int) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.received_at is None:
            self.signal_name, self.received_at = name, now
            log.warning(
                "received %s: finishing the step in flight, then saving last.ckpt "
                "(a second signal exits at once without saving)",
                name,
            )
            self._start_grace_timer()
            self._start_peer_check()
        elif now - self.received_at <= DUPLICATE_WINDOW_S:
            return  # the same request, delivered twice (torchrun forwards the group's signal)
        elif self.finished.is_set():  # e.g. SLURM stopping the job it was just asked to requeue
            sys.stderr.write(f"\nreceived {name} after last.ckpt was saved: exiting\n")
            self.after_save = []
            self.exit_now(0)
        else:
            sys.stderr.write(f"\nreceived {name} again: exiting now without saving\n")
            self.exit_now(EXIT_SECOND_SIGNAL)

    def _start_grace_timer(self) -> None:
        threading.Thread(target=self._watch_grace, name="shutdown-grace", daemon=True).start()

    def _start_peer_check(self) -> None:
        if self.peers_gone is not None:
            self.peer_check = threading.Thread(
                target=self._check_peers, name="shutdown-peers", daemon=True
            )
            self.peer_check.start()

    def check_peers(self) -> None:
        """Before an error unwinds a multi-rank run: exits with the peer check's one line when
        a peer is gone (a collective fails at once when its peer's sockets close), else
        returns. Waits for the check a signal started, or runs one."""
        if self.peer_check is not None:
            self.peer_check.join(PEER_SILENCE_S + STORE_WAIT_S)
        else:
            self._check_peers()

    def _check_peers(self) -> None:
        """A peer that stopped answering cannot finish the step with us: leave now, saving
        nothing, rather than sit in the collective until torchrun's SIGKILL (30 s later)."""
        peers_gone = self.peers_gone  # teardown may unset it meanwhile
        gone = peers_gone(PEER_SILENCE_S) if peers_gone is not None else []
        if not gone or self.finished.is_set():
            return
        sys.stderr.write(
            f"\n{', '.join(gone)} stopped answering (killed, or its node is lost): the step in "
            f"flight cannot finish; exiting with code {EXIT_STALLED} without saving, the "
            "checkpoints on disk are untouched. torchrun --max-restarts or a resubmitted job "
            "resumes from the last checkpoint.\n"
        )
        self.exit_now(EXIT_STALLED)

    def _watch_grace(self) -> None:
        if self.finished.wait(self.grace_period_s):
            return
        if self.waiting_for_data:
            log.warning(
                "no batch arrived within %.0f s of %s: interrupting the data wait to save the "
                "last completed step",
                self.grace_period_s,
                self.signal_name,
            )
            signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
            if self.finished.wait(self.grace_period_s):
                return
        sys.stderr.write(
            f"\nthe step in flight did not finish within {self.grace_period_s:.0f} s of "
            f"{self.signal_name} (a hung collective or stuck I/O): exiting with code "
            f"{EXIT_STALLED}; the checkpoints on disk are untouched. Raise "
            "callbacks.preemption.grace_period_s if steps are this slow.\n"
        )
        self.exit_now(EXIT_STALLED)

    def _interrupt_data_wait(self, signum: int, frame: object) -> None:
        if self.waiting_for_data:
            raise StalledShutdown(f"{self.signal_name} while waiting for data")

    def exit_now(self, code: int) -> None:
        """Leave without unwinding: clean-ups, then kill our children, then ``os._exit``.

        With code 0 (``last.ckpt`` is saved) the ``after_save`` hooks run too: close the
        loggers, requeue the job."""
        for cleanup in self.on_exit + (self.after_save if code == 0 else []):
            with suppress(BaseException):  # SystemExit included: we are leaving anyway
                cleanup()
        kill_descendants()
        with suppress(Exception):
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(code)


def _kill_tree(pid: int, include_root: bool = True) -> None:
    import psutil

    with suppress(psutil.Error):
        root = psutil.Process(pid)
        for process in [*root.children(recursive=True), *([root] if include_root else [])]:
            with suppress(psutil.Error):
                process.kill()


def kill_descendants() -> None:
    """SIGKILL every process this one started (loader workers, their ``pipe:`` commands).

    Workers ignore shutdown signals by design, and a stuck ``pipe:`` command may ignore them
    too; a hard exit must not leave them running for hours.
    """
    _kill_tree(os.getpid(), include_root=False)


def kill_loader_workers() -> None:
    """SIGKILL the DataLoader workers (and what they started) once nothing more is needed
    from them: a worker stuck in I/O would otherwise hold the shutdown for join timeouts."""
    import multiprocessing

    if threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler turns a killed worker into an error in the main process.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in multiprocessing.active_children():
        _kill_tree(worker.pid)


SHUTDOWN = ShutdownRequest()


def _ignore(signum: int, frame: object) -> None:
    """A handler that does nothing. Unlike SIG_IGN it is reset by exec, so commands a worker
    starts (``pipe:aws s3 cp ...``) still stop when their process group is signalled."""


def make_worker_deaf(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: shutdown is the main process's job, not the workers'."""
    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, _ignore)
    die_with_parent()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)


def die_with_parent() -> None:
    """A deaf worker whose main process is killed (``kill -9``, the OOM killer) would live on,
    blocked on a queue nobody reads, holding its memory: Linux kills it with its parent
    (``PR_SET_PDEATHSIG``; the workers are forked by the main thread, which lives as long as
    the process). Elsewhere torch's own watchdog ends it at its next idle wait."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing

    parent = multiprocessing.parent_process()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if parent is not None and os.getppid() != parent.pid:  # it died before we asked
        os._exit(0)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold shutdown signals while workers are forked (they inherit the mask), so none dies
    before ``make_worker_deaf`` runs; a signal that arrived meanwhile is delivered on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
