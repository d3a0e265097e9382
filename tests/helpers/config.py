"""The real config tree, composed as a user's command line would, with the tiny smoke test."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import pbe_lightning.utils.resolvers  # noqa: F401  (${pbe.*} in the trainer configs)

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"

# A few steps on 64 px with a worker-less loader (conf/debug/tiny.yaml): a user's smoke test.
TINY = ["debug=tiny"]

# Twelve shards of 4 records under an 8-record shuffle buffer: kill and signal points fall
# after the stream crossed shard boundaries, with records of several shards in its buffer.
SMALL_SHARDS = [
    "data=webdataset",
    "data.shards='${paths.cache_dir}/small-shards/train-{000000..000011}.tar'",
]


def compose_config(output_dir: Path, cache: Path, *overrides: str) -> DictConfig:
    """``train.yaml`` with ``debug=tiny`` and ``overrides``, writing under ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache)
    return cfg
