"""``Job``: what the summary knows of one job of a sweep (``sweeps.jobs`` fills it in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

Series = dict[str, list[tuple[int, float]]]  # metric -> (steps done, value), by step


@dataclass
class Job:
    name: str  # the job's folder, relative to the sweep folder
    path: Path
    overrides: list[str]
    variant: str = ""
    series: Series = field(default_factory=dict)
    csv_on: bool = True  # the config had a CSV logger (True when unknown)
    wandb_group: str | None = None
    wandb_runs: list[Path] = field(default_factory=list)
    source: str = ""  # where the metrics came from: "csv", "wandb" or "" (none)
    max_steps: int | None = None
    status: str = ""
    note: str = ""

    @property
    def steps(self) -> int | None:
        return max((s for points in self.series.values() for s, _ in points), default=None)
