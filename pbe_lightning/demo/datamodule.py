"""``data=demo``: the production DataModule on generated shards, written once into a cache."""

from __future__ import annotations

from typing import Any

from pbe_lightning.data.datamodule import PaintByExampleDataModule
from pbe_lightning.demo.dataset import ensure_demo_dataset


class DemoDataModule(PaintByExampleDataModule):
    """Generates the demo shards into ``demo_dir`` (once), then reads them like any shards."""

    def __init__(self, demo_dir: str, **options: Any) -> None:
        super().__init__(**options)
        self.demo_dir = demo_dir

    def prepare_data(self) -> None:
        ensure_demo_dataset(self.demo_dir)
