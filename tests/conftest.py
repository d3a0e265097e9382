"""Fixtures only; what they build lives in ``tests/helpers/``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers.config import SMALL_SHARDS, compose_config
from tests.helpers.training import train_tiny_checkpoint

# Never wait on a login or a hub, whatever the caller's environment says.
os.environ["WANDB_MODE"] = "offline"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models and demo shards, generated once per test session (like a user's cache)."""
    path = Path(os.environ.get("PBE_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["PBE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def small_shards(cache_dir: Path) -> list[str]:
    """Writes the shards ``SMALL_SHARDS`` trains on into the cache; returns the overrides."""
    from pbe_lightning.demo.dataset import ensure_demo_dataset

    ensure_demo_dataset(cache_dir / "small-shards", samples=48, per_shard=4)
    return SMALL_SHARDS


@pytest.fixture
def tiny_cfg(tmp_path: Path, cache_dir: Path):
    """``tiny_cfg(*overrides)`` -> the composed real config, tiny, writing under tmp_path."""

    def make(*overrides: str) -> DictConfig:
        return compose_config(tmp_path / "run", cache_dir, *overrides)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A real train.py checkpoint of the tiny model, trained once per test session and shared
    by the edit, evaluate and export tests (treat it as read-only)."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("trained") / "run", cache_dir)
