"""A rank that dies or stops answering, and the ranks that survive it.

One rank of a torchrun group killed with ``kill -9``: torchrun restarts the group, which
resumes from the last checkpoint and ends with the weights of an uninterrupted run; the
surviving rank, signalled by torchrun while it waits in a collective for the dead one, leaves
at once (code 3, nothing saved) instead of sitting there until torchrun's SIGKILL. A rank that
freezes (``SIGSTOP``: a hung node) leaves its peer blocked inside a collective, in C++, where
Python runs no signal handler: the scheduler's SIGTERM still ends that peer at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pbe_lightning.shutdown import EXIT_STALLED
from tests.helpers.config import REPO, SMALL_SHARDS, TINY
from tests.helpers.processes import finish, free_port, kill_group, start_train, wait_for_step

RUN = [
    "trainer=multinode",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    *TINY,
    "trainer.max_steps=8",
    "data.batches_per_epoch=3",  # validations between the checkpoints
    "data.num_workers=1",  # its loader worker must die with it
    "trainer.deterministic=true",
    "callbacks.checkpoint.every_n_train_steps=2",
    *SMALL_SHARDS,
]
# torch 2.14's torchrun keeps one TCP store across restarts, and a restarted group reads the
# dead group's gloo addresses from it (connectFullMesh: connection refused). The dynamic
# rendezvous with a store per round is what restarts need (README: Scaling out).
ELASTIC = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture(autouse=True)
def _shards_written(small_shards: list[str]) -> None:
    """RUN trains on SMALL_SHARDS."""


def torchrun(cwd: Path, cache_dir: Path, *extra: str) -> subprocess.Popen:
    cwd.mkdir(exist_ok=True)
    args = [
        "--nnodes=1",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--rdzv-id=pbe-elastic",  # the run folder: torchrun-pbe-elastic, kept across restarts
        str(REPO / "train.py"),
        *RUN,
        *extra,
    ]
    return start_train(args, cwd, cache_dir, module="torch.distributed.run", **ELASTIC)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The worker torchrun started for ``rank``."""
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"torchrun has no rank {rank}")


def pgid_of(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except ProcessLookupError:
        return None


def last_checkpoint(cwd: Path) -> dict:
    path = cwd / "outputs" / "train" / "torchrun-pbe-elastic" / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_restarts_the_group_which_resumes_exactly(tmp_path, cache_dir):
    reference = finish(torchrun(tmp_path / "reference", cache_dir))
    assert reference.returncode == 0, reference.stderr[-3000:]

    job = tmp_path / "job"
    run_dir = job / "outputs" / "train" / "torchrun-pbe-elastic"
    pace = [
        "+callbacks.pace._target_=tests.helpers.callbacks.Pace",
        f"+callbacks.pace.dirpath={run_dir}",
        "+callbacks.pace.seconds=0.5",
    ]
    launcher = torchrun(job, cache_dir, *pace)
    wait_for_step(launcher, run_dir, 5)  # last.ckpt holds step 4; step 6 is in flight
    victim = rank_process(launcher, 1)
    group = os.getpgid(victim.pid)  # torchrun starts each rank in a session of its own
    try:
        victim.kill()  # SIGKILL to the rank's main process alone: the OOM killer, say
        result = finish(launcher, timeout=400)
        # Its loader workers (deaf to shutdown signals) died with it, not orphaned.
        assert [p.pid for p in psutil.process_iter() if pgid_of(p) == group] == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # The survivor left on torchrun's SIGTERM, saying why, and saved nothing torn.
    assert output.count("rank 1 stopped answering") == 1
    assert "Unable to shutdown process" not in output  # torchrun never had to SIGKILL it
    assert output.count("resuming from") == 2  # both ranks of the restarted group
    resumed, expected = last_checkpoint(job), last_checkpoint(tmp_path / "reference")
    assert resumed["global_step"] == expected["global_step"] == 8
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def steps_stand_still(run_dir: Path, seconds: float, timeout: float = 60) -> None:
    """Until Pace's step file has not changed for ``seconds``: the rank waits on its peer."""
    last, since = None, time.monotonic()
    deadline = since + timeout
    while time.monotonic() - since < seconds:
        assert time.monotonic() < deadline, "training never stood still"
        step = (run_dir / "step").read_text()
        if step != last:
            last, since = step, time.monotonic()
        time.sleep(0.05)


@pytest.mark.slow
def test_a_rank_blocked_on_a_frozen_peer_leaves_at_once_when_the_job_is_stopped(
    tmp_path, cache_dir
):
    run_dir = tmp_path / "run"
    args = [
        "trainer=ddp",  # Lightning starts rank 1 as a child of rank 0, in its process group
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        *TINY,
        "trainer.max_steps=1000",
        # Longer than the test waits: only the peer check can end rank 0 in time.
        "callbacks.preemption.grace_period_s=600",
        "+callbacks.pace._target_=tests.helpers.callbacks.Pace",
        f"+callbacks.pace.dirpath={run_dir}",
        "+callbacks.pace.seconds=0.2",
        f"hydra.run.dir={run_dir}",
    ]
    process = start_train(args, tmp_path, cache_dir)
    wait_for_step(process, run_dir, 3)
    (frozen,) = [
        child
        for child in psutil.Process(process.pid).children()
        if child.environ().get("LOCAL_RANK") == "1"
    ]
    frozen.suspend()  # SIGSTOP: alive, sockets open, silent
    steps_stand_still(run_dir, seconds=3)  # rank 0 is inside its next collective
    os.killpg(process.pid, signal.SIGTERM)  # the scheduler stops the job
    result = finish(process, timeout=120)

    assert result.returncode == EXIT_STALLED, result.stderr[-3000:]
    assert "rank 1 stopped answering" in result.stderr
    assert "did not finish within" not in result.stderr  # not the grace timer


# A rank's main process forking a loader worker the way torch's DataLoader does (fork, then
# worker_init_fn=make_worker_deaf), and the worker then stuck on a queue nobody will read.
RANK_WITH_A_WORKER = """
import multiprocessing, time
from pbe_lightning.shutdown import make_worker_deaf

def stuck_worker():
    make_worker_deaf()
    time.sleep(600)

if __name__ == "__main__":
    worker = multiprocessing.get_context("fork").Process(target=stuck_worker)
    worker.start()
    print(worker.pid, flush=True)
    time.sleep(600)
"""


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_loader_worker_dies_with_its_main_process_killed_with_sigkill(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_WITH_A_WORKER)
    rank = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        start_new_session=True,
    )
    try:
        worker = psutil.Process(int(rank.stdout.readline()))
        rank.kill()  # SIGKILL to the main process alone (the OOM killer); deaf, the worker
        rank.wait()  # would sleep on, holding its memory, if nothing ended it
        deadline = time.monotonic() + 30
        while not ended(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ended(worker)
    finally:
        kill_group(rank)
