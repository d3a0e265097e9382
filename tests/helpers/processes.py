"""``python train.py`` run as a user (or a scheduler) runs it: its own session, files for output."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.config import REPO


def start_train(
    args: list[str], cwd: Path, cache: Path, module: str | None = None, **env: str
) -> subprocess.Popen:
    """``python train.py ARGS`` in its own process group (a session, as a job step has), so a
    test can signal the whole group as a scheduler does, and kill all of it when done.

    ``module`` runs ``python -m module ARGS`` instead (torchrun). Output goes to files, not
    pipes: a stray grandchild (a stuck ``pipe:`` command) keeping a pipe open must not make
    the test wait for it.
    """
    environment = dict(os.environ, PBE_CACHE_DIR=str(cache), PYTHONPATH=str(REPO), **env)
    outputs = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 (process-long)
    command = ["-m", module, *args] if module else [str(REPO / "train.py"), *args]
    process = subprocess.Popen(
        [sys.executable, *command],
        cwd=cwd,
        env=environment,
        stdout=outputs[0],
        stderr=outputs[1],
        start_new_session=True,
    )
    process.output_files = outputs
    return process


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (loader workers, DDP ranks, pipes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _read(stream) -> str:
    stream.seek(0)
    return stream.read().decode(errors="replace")


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Waits for ``process``; on a timeout or a failed test, nothing of it keeps running."""
    try:
        process.wait(timeout=timeout)
    finally:
        kill_group(process)
    stdout, stderr = (_read(file) for file in process.output_files)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-8000:])
    return result


def run_train(
    args: list[str], cwd: Path, cache: Path, timeout: int = 300, **env: str
) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` as a user runs it, in a fresh process group."""
    return finish(start_train(args, cwd, cache, **env), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reached_step(folder: Path) -> int:
    """The step ``tests.helpers.callbacks.Pace`` last wrote into ``folder``; -1 before any."""
    try:
        return int((folder / "step").read_text())
    except (FileNotFoundError, ValueError):
        return -1


def wait_for_step(process: subprocess.Popen, folder: Path, step: int, timeout: float = 240) -> int:
    """Until ``Pace`` says training reached ``step``; kills the group if it never does."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        reached = reached_step(folder)
        if reached >= step:
            return reached
        time.sleep(0.02)
    kill_group(process)
    raise AssertionError(f"step {step} not reached in {timeout} s (rc {process.returncode})")
