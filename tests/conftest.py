"""Shared fixtures: the real config tree with tiny overrides, and a per-session model cache."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import pbe_lightning.resolvers  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Never wait on a login or a hub, whatever the caller's environment says.
os.environ["WANDB_MODE"] = "offline"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")

# A few steps on 64 px, one worker-less loader: what a user's smoke test would override.
TINY = [
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.batches_per_epoch=2",
    "data.val_samples=2",
    "data.shuffle_buffer=8",
    "model.sample_steps=2",
    "callbacks.checkpoint.every_n_train_steps=2",
    "logger=csv",
]


# Twelve shards of 4 records under an 8-record shuffle buffer: kill and signal points fall
# after the stream crossed shard boundaries, with records of several shards in its buffer.
SMALL_SHARDS = [
    "data.demo_dir=null",
    "data.shards='${paths.cache_dir}/small-shards/train-{000000..000011}.tar'",
]


@pytest.fixture(scope="session")
def small_shards(cache_dir: Path) -> list[str]:
    """Writes the shards ``SMALL_SHARDS`` trains on into the cache; returns the overrides."""
    from pbe_lightning.data.demo import ensure_demo_dataset

    ensure_demo_dataset(cache_dir / "small-shards", samples=48, per_shard=4)
    return SMALL_SHARDS


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models and demo shards, generated once per test session (like a user's cache)."""
    path = Path(os.environ.get("PBE_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["PBE_CACHE_DIR"] = str(path)
    return path


def compose_config(output_dir: Path, cache: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path: Path, cache_dir: Path):
    """``tiny_cfg(*overrides)`` -> the composed real config, tiny, writing under tmp_path."""

    def make(*overrides: str) -> DictConfig:
        return compose_config(tmp_path / "run", cache_dir, *overrides)

    return make


def start_train(
    args: list[str], cwd: Path, cache: Path, module: str | None = None, **env: str
) -> subprocess.Popen:
    """``python train.py ARGS`` in its own process group (a session, as a job step has), so a
    test can signal the whole group as a scheduler does, and kill all of it when done.

    ``module`` runs ``python -m module ARGS`` instead (torchrun). Output goes to files, not pipes: a stray grandchild (a stuck ``pipe:`` command) keeping a
    pipe open must not make the test wait for it.
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


def bare_trainer(max_steps: int):
    """A plain CPU Trainer with no logging, checkpoints or validation: for step-level tests."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
