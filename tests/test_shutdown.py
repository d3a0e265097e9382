"""Faults as clusters deliver them, each to a real ``train.py`` process in its own group.

Signals go to the whole process group (``os.killpg``), as scancel, a time limit, timeout and
Ctrl-C send them: loader workers included. Stuck storage is a ``pipe:`` command deaf to
signals; a killed write runs with ``$TMPDIR`` on another filesystem.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pbe_lightning.checkpoints import NoReadableCheckpoint, newest_readable, save_atomically
from pbe_lightning.demo.dataset import ensure_demo_dataset
from pbe_lightning.shutdown import EXIT_SECOND_SIGNAL, EXIT_STALLED
from tests.helpers.config import REPO, SMALL_SHARDS, TINY
from tests.helpers.processes import (
    finish,
    free_port,
    kill_group,
    run_train,
    start_train,
    wait_for_step,
)

RUN = [
    *TINY,
    "trainer.max_steps=8",
    "data.batches_per_epoch=3",  # epoch ends and validations fall between signal points
    "data.num_workers=2",  # the workers get the group's signal too
    "trainer.deterministic=true",
    "callbacks.checkpoint.every_n_train_steps=100",
    *SMALL_SHARDS,
]


@pytest.fixture(autouse=True)
def _shards_written(small_shards: list[str]) -> None:
    """RUN trains on SMALL_SHARDS."""


def paced(run_dir: Path, seconds: float = 0.25) -> list[str]:
    """Slow steps (weights unchanged) and a ``step`` file: signal at a chosen step."""
    return [
        "+callbacks.pace._target_=tests.helpers.callbacks.Pace",
        f"+callbacks.pace.dirpath={run_dir}",
        f"+callbacks.pace.seconds={seconds}",
    ]


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr  # Hydra logs to stdout, warnings go to stderr


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()
    ):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def blocked_on_the_source(pid: int) -> bool:
    """The kernel's word for it (Linux ``wchan``): the main thread sleeps waiting for the
    source's pipe to have data (``select``), reading it, or waiting for the source's command
    to exit after its last byte."""
    try:
        where = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return "pipe" in where or "select" in where or "poll" in where or where == "do_wait"


def wait_for_stall(process: subprocess.Popen, run_dir: Path, hanging: Path) -> int:
    """The step at which training waits on the hung source: the source said it hangs, the
    main process sleeps on it, and no step has come for a second."""
    last, since = None, time.time()
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        try:
            step = int((run_dir / "step").read_text())
        except (FileNotFoundError, ValueError):
            step = None
        if step != last:
            last, since = step, time.time()
        elif (
            step is not None
            and hanging.exists()
            and blocked_on_the_source(process.pid)
            and time.time() - since > 1
        ):
            return step
        time.sleep(0.1)
    kill_group(process)
    raise AssertionError(f"training did not stall (rc {process.returncode}, step {last})")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir, small_shards) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_train([*RUN, f"hydra.run.dir={run_dir}"], run_dir, cache_dir)
    assert result.returncode == 0
    return load(run_dir / "checkpoints" / "last.ckpt")


# -- signals ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_signal_to_the_process_group_saves_and_the_resume_is_exact(
    name, tmp_path, cache_dir, uninterrupted
):
    run_dir = tmp_path / "run"
    step = random.Random(name).randint(2, 6)
    process = start_train([*RUN, *paced(run_dir), f"hydra.run.dir={run_dir}"], tmp_path, cache_dir)
    wait_for_step(process, run_dir, step)
    os.killpg(process.pid, getattr(signal, name))  # main process and loader workers alike
    result = finish(process, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "killed by signal" not in output(result)  # no worker died of it
    saved = load(run_dir / "checkpoints" / "last.ckpt")
    assert step <= saved["global_step"] < 8  # at most the step in flight was finished

    result = run_train([*RUN, "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path, cache_dir)
    assert result.returncode == 0
    assert_same_weights(load(run_dir / "checkpoints" / "last.ckpt"), uninterrupted)


def small_shard(cache_dir: Path, destination: Path, members: int = 60) -> Path:
    """The first ``members`` files of a demo shard: a few steps' worth of records."""
    demo = cache_dir / "demo" / "v2"
    ensure_demo_dataset(str(demo))
    with (
        tarfile.open(demo / "train-000000.tar") as source,
        tarfile.open(destination, "w") as out,
    ):
        for member in source.getmembers()[:members]:
            out.addfile(member, source.extractfile(member))
    return destination


def stuck_source(tmp_path: Path, shard: Path, once: bool) -> str:
    """A ``pipe:`` source that serves ``shard``, then hangs deaf to signals (stuck storage);
    with ``once``, only the first time (storage that recovers)."""
    marker, hanging = tmp_path / "hung_once", tmp_path / "hanging"
    script = tmp_path / "stuck_source.sh"
    hang = f"touch {hanging}; exec sleep 600"  # the marker tells the test it hangs now
    hang = f"[ -e {marker} ] || {{ touch {marker}; {hang}; }}" if once else hang
    script.write_text(f'#!/bin/bash\ntrap "" TERM INT USR1 USR2\ncat {shard}\n{hang}\n')
    script.chmod(0o755)
    return f"pipe:{script}"


TO_REPLACE = ("trainer.max_steps", "data.num_workers")


def stuck_run(tmp_path: Path, cache_dir: Path, source: str, grace: float) -> list[str]:
    val = cache_dir / "demo" / "v2" / "train-000001.tar"
    return [
        *[o for o in RUN if o not in SMALL_SHARDS and not o.startswith(TO_REPLACE)],
        "trainer.max_steps=40",
        "data.num_workers=0",  # the main process itself blocks in the read
        f"data.shards={source}",
        f"data.val_shards={val}",
        f"callbacks.preemption.grace_period_s={grace}",
    ]


@pytest.mark.slow
def test_a_signal_while_the_data_source_hangs_saves_the_last_completed_step(tmp_path, cache_dir):
    shard = small_shard(cache_dir, tmp_path / "small.tar")
    args = stuck_run(tmp_path, cache_dir, stuck_source(tmp_path, shard, once=True), grace=3)
    (tmp_path / "hung_once").touch()  # the reference: storage that never hangs
    reference_dir = tmp_path / "reference"
    assert run_train([*args, f"hydra.run.dir={reference_dir}"], tmp_path, cache_dir).returncode == 0
    (tmp_path / "hung_once").unlink()

    run_dir = tmp_path / "run"
    process = start_train(
        [*args, *paced(run_dir, 0.0), f"hydra.run.dir={run_dir}"], tmp_path, cache_dir
    )
    stalled_at = wait_for_stall(process, run_dir, tmp_path / "hanging")
    signalled = time.time()
    os.killpg(process.pid, signal.SIGTERM)
    result = finish(process, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.time() - signalled < 30  # grace 3 s, then save and exit: never a hang
    assert "interrupting the data wait" in output(result)
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == stalled_at

    result = run_train([*args, "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path, cache_dir)
    assert result.returncode == 0
    assert_same_weights(
        load(run_dir / "checkpoints" / "last.ckpt"),
        load(reference_dir / "checkpoints" / "last.ckpt"),
    )


@pytest.mark.slow
def test_a_second_signal_exits_at_once_without_saving(tmp_path, cache_dir):
    shard = small_shard(cache_dir, tmp_path / "small.tar")
    args = stuck_run(tmp_path, cache_dir, stuck_source(tmp_path, shard, once=False), grace=300)
    run_dir = tmp_path / "run"
    process = start_train(
        [*args, *paced(run_dir, 0.0), f"hydra.run.dir={run_dir}"], tmp_path, cache_dir
    )
    wait_for_stall(process, run_dir, tmp_path / "hanging")
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C ...
    time.sleep(2)
    signalled = time.time()
    os.killpg(process.pid, signal.SIGINT)  # ... and Ctrl-C again: the user means it
    result = finish(process, timeout=60)
    assert result.returncode == EXIT_SECOND_SIGNAL
    assert time.time() - signalled < 10
    assert "again: exiting now" in output(result)
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_a_step_that_never_finishes_exits_non_zero_and_leaves_the_checkpoints(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = [
        *RUN,
        *paced(run_dir, 0.0),
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.preemption.grace_period_s=3",
        "+callbacks.hang._target_=tests.helpers.callbacks.HangAt",
        "+callbacks.hang.step=3",
        f"+callbacks.hang.dirpath={run_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    process = start_train(args, tmp_path, cache_dir)
    wait_for_step(process, run_dir, 3)
    while not (run_dir / "hanging").exists():  # inside the step, not waiting for its data
        assert process.poll() is None
        time.sleep(0.05)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    os.killpg(process.pid, signal.SIGTERM)
    result = finish(process, timeout=60)
    assert result.returncode == EXIT_STALLED, result.stderr[-3000:]
    assert "did not finish within 3 s" in output(result)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert load(last)["global_step"] == 2


# -- checkpoint files ---------------------------------------------------------------------


@contextmanager
def other_filesystem(near: Path):
    """A folder on another filesystem than ``near``: a fresh tmpfs (root), else /dev/shm."""
    mount = near.parent / "tmpfs"
    mount.mkdir(exist_ok=True)
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(mount)], capture_output=True
        ).returncode
        == 0
    )
    folder = mount if mounted else Path("/dev/shm") / f"pbe-test-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    if os.stat(folder).st_dev == os.stat(near).st_dev:
        pytest.skip("no second filesystem for $TMPDIR here (needs root or a tmpfs /dev/shm)")
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        else:
            subprocess.run(["rm", "-rf", str(folder)], check=False)


def signature(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@pytest.mark.slow
def test_a_checkpoint_write_killed_midway_leaves_the_previous_last_ckpt(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    args = [
        *RUN,
        *paced(run_dir, 0.5),
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.checkpoint.save_top_k=0",  # only last.ckpt: the file under test
        "+callbacks.ballast._target_=tests.helpers.callbacks.Ballast",
        "+callbacks.ballast.megabytes=400",  # a write long enough to land a kill in it
        f"hydra.run.dir={run_dir}",
    ]
    with other_filesystem(tmp_path) as temp_dir:
        process = start_train(args, tmp_path, cache_dir, TMPDIR=str(temp_dir))
        wait_for_step(process, run_dir, 3)  # step 2's save is complete
        previous = signature(folder / "last.ckpt")
        deadline = time.time() + 120
        while time.time() < deadline:  # step 4's write begins: kill -9 the whole job now
            writing = [p for p in folder.iterdir() if "last" in p.name and p.name != "last.ckpt"]
            if writing or signature(folder / "last.ckpt") != previous:
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        result = finish(process, timeout=60)
        assert result.returncode == -signal.SIGKILL, "the kill never met a write"
    assert load(folder / "last.ckpt")["global_step"] in (2, 4)  # old or new, never torn

    result = run_train([*args, "ckpt_path=last"], tmp_path, cache_dir)
    assert result.returncode == 0
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]  # the unfinished write is gone
    assert load(folder / "last.ckpt")["global_step"] == 8


@pytest.mark.slow
def test_an_unreadable_last_ckpt_falls_back_to_the_newest_readable(
    tmp_path, cache_dir, uninterrupted
):
    run_dir = tmp_path / "run"
    args = [*RUN, "callbacks.checkpoint.every_n_train_steps=2", f"hydra.run.dir={run_dir}"]
    # The 8-step run stopped at step 6: its learning rate decays over 8 steps, as the resumed
    # run's (and the uninterrupted run's) does.
    stopped_early = ["trainer.max_steps=6", "model.lr_scheduler.total_steps=8"]
    assert run_train([*args, *stopped_early], tmp_path, cache_dir).returncode == 0
    folder = run_dir / "checkpoints"
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    (folder / "step_0000006.ckpt").write_bytes(b"")  # and a write that never finished

    result = run_train([*args, "ckpt_path=last"], tmp_path, cache_dir)
    assert result.returncode == 0
    assert "resuming from" in output(result) and "step_0000004.ckpt" in output(result)
    assert "skipped unreadable last.ckpt" in output(result)
    assert_same_weights(load(last), uninterrupted)


def test_no_readable_checkpoint_is_an_error_naming_each_file(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")
    (tmp_path / "step_0000002.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(NoReadableCheckpoint) as error:
        newest_readable(tmp_path)
    message = str(error.value)
    assert "last.ckpt (0 bytes" in message and "step_0000002.ckpt (" in message
    assert "ckpt_path=" in message  # and the fix
    assert newest_readable(tmp_path / "empty") is None  # a first start: nothing to resume


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "last.ckpt"
    save_atomically({"state_dict": {}, "global_step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomically({"state_dict": {}, "global_step": 2, "bad": Unpicklable()}, path)
    assert load(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# -- the same run, resumed ----------------------------------------------------------------


def test_resuming_with_another_architecture_stops_with_the_differing_keys(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"]
    assert run_train(args, tmp_path, cache_dir).returncode == 0
    changed = [*args, "trainer.max_steps=4", "ckpt_path=last", "model.encoder.bottleneck=tokens"]
    result = run_train(changed, tmp_path, cache_dir)
    assert result.returncode != 0
    assert "model.encoder.bottleneck: checkpoint 'cls', now 'tokens'" in output(result)
    assert "allow_architecture_change=true" in output(result)
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2  # nothing trained

    result = run_train([*changed, "allow_architecture_change=true"], tmp_path, cache_dir)
    assert result.returncode == 0  # an intended change (same shapes) goes ahead
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = [*TINY, "logger=wandb", "logger.wandb.offline=true", f"hydra.run.dir={run_dir}"]
    assert run_train([*args, "trainer.max_steps=2"], tmp_path, cache_dir).returncode == 0
    assert run_train([*args, "ckpt_path=last"], tmp_path, cache_dir).returncode == 0
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)


@pytest.mark.slow
def test_torchrun_signalled_as_a_group_saves_and_the_same_command_resumes(tmp_path, cache_dir):
    def torchrun(cwd: Path, *extra: str) -> subprocess.Popen:
        cwd.mkdir(exist_ok=True)
        args = [
            "--nnodes=1",  # not --standalone: it names every start's run anew
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "--rdzv-id=pbe-shutdown",
            str(REPO / "train.py"),
            "trainer=multinode",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            *RUN,
            *extra,
        ]
        return start_train(args, cwd, cache_dir, module="torch.distributed.run")

    reference = finish(torchrun(tmp_path / "reference"))
    assert reference.returncode == 0
    run_dir = tmp_path / "job" / "outputs" / "train" / "torchrun-pbe-shutdown"
    process = torchrun(tmp_path / "job", *paced(run_dir))
    wait_for_step(process, run_dir, 3)
    os.killpg(process.pid, signal.SIGTERM)  # torchrun and both ranks; torchrun forwards it too
    result = finish(process, timeout=120)
    # torchrun reports the signal as its own failure; the ranks saved and exited 0 before.
    assert result.returncode == 1 and "got signal: 15" in output(result)
    assert output(result).count("SIGTERM: saved") == 2  # both ranks stopped at one step
    assert 3 <= load(run_dir / "checkpoints" / "last.ckpt")["global_step"] < 8

    # The same command again (an elastic restart, or a resubmitted job) continues the run.
    result = finish(torchrun(tmp_path / "job"))
    assert result.returncode == 0 and "resuming from" in output(result)
    expected = tmp_path / "reference" / "outputs" / "train" / "torchrun-pbe-shutdown"
    assert_same_weights(
        load(run_dir / "checkpoints" / "last.ckpt"), load(expected / "checkpoints" / "last.ckpt")
    )
