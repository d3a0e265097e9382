"""A job's metric series: every ``val/*`` column and ``train/loss``, at the steps done.

CSV is the source: the CSV logger's ``<job>/csv/version_*/metrics.csv`` (``logger=wandb_csv``,
the demo's default, or ``logger=csv``; the versions of a resumed run are merged, the later one
winning a step). A job without CSV logs (``logger=wandb``) is read from its W&B run's binary
``.wandb`` log by wandb's own reader, ``python -m wandb leet inspect --json`` (wandb 0.31 has
it; an older wandb has none, and the job is then listed without metrics: W&B's group view of
the sweep is the online equivalent of the summary).

Steps count optimiser steps done, as the checkpoint names do (``step_0000004.ckpt``):
Lightning's CSV ``step`` column (and W&B's ``trainer/global_step``) is that number minus one.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pbe_lightning.sweeps.job import Series

NO_CSV = (
    "no CSV logs: the CSV logger was off; run the sweep with logger=wandb_csv (W&B + CSV) or "
    "logger=csv to summarise it here, or compare its runs in W&B's group view"
)
NON_FINITE = ("NaN", "Infinity", "-Infinity")  # how W&B's history writes these floats

Merged = dict[str, dict[int, float]]  # metric -> step -> value, a later source winning a step


def wanted_column(name: str) -> bool:
    return name.startswith("val/") or name == "train/loss"


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def add_points(merged: Merged, step: int, values: dict[str, float]) -> None:
    for metric, value in values.items():
        merged.setdefault(metric, {})[step] = value


def as_series(merged: Merged) -> Series:
    return {metric: sorted(points.items()) for metric, points in merged.items()}


# ---------------------------------------------------------------------------- CSV


def csv_version(path: Path) -> int:
    """The ``N`` of ``version_N/metrics.csv``; -1 for a folder named otherwise."""
    number = path.parent.name.removeprefix("version_")
    return int(number) if number.isdigit() else -1


def csv_values(row: dict) -> dict[str, float]:
    """The wanted columns of one CSV row that hold a number."""
    values = {}
    for column, text in row.items():
        if column and text not in (None, "") and wanted_column(column):
            try:
                values[column] = float(text)
            except ValueError:
                continue
    return values


def csv_rows(path: Path) -> Iterator[tuple[int, dict[str, float]]]:
    """(steps done, wanted values) of each row of one ``metrics.csv`` that has a step."""
    with path.open(newline="") as stream:
        for row in csv.DictReader(stream):
            step = row.get("step")
            if step and step.strip().lstrip("-").isdigit():
                yield int(step) + 1, csv_values(row)


def read_csv_logs(job_folder: Path) -> tuple[Series, list[Path]]:
    """A job's series from all its CSV logs' versions, and the files read."""
    files = sorted(job_folder.glob("*/version_*/metrics.csv"), key=csv_version)
    merged: Merged = {}
    for path in files:
        for step, values in csv_rows(path):
            add_points(merged, step, values)
    return as_series(merged), files


# ---------------------------------------------------------------------------- W&B


def history_values(item: dict) -> dict[str, float]:
    """The wanted numbers of one W&B history record; media (``<key>._type``) are left out."""
    media = {k.rsplit(".", 1)[0] for k in item if k.endswith("._type")}
    values = {}
    for key, value in item.items():
        if isinstance(value, str) and value in NON_FINITE:
            value = float(value)
        if wanted_column(key) and key.rsplit(".", 1)[0] not in media and is_number(value):
            values[key] = float(value)
    return values


def history_record(line: str) -> tuple[int, dict[str, float]] | None:
    """(steps done, wanted values) of one ``wandb leet inspect --json`` line; None for a line
    that is not a history record with a step."""
    if '"type":"history"' not in line:
        return None
    try:
        item = json.loads(line)["history"]["item"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(item, dict):
        return None
    step = item.get("trainer/global_step", item.get("_step"))
    if not is_number(step):
        return None
    return int(step) + 1, history_values(item)


def read_wandb_history(run: Path) -> tuple[Merged, str]:
    """The history of one W&B run folder, read from its ``.wandb`` log by wandb's own reader
    (``wandb leet inspect --json``, wandb >= 0.31). Returns (points, error)."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run)]
    merged: Merged = {}
    with tempfile.TemporaryFile() as errors:
        try:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, text=True
            )
        except OSError as error:
            return {}, str(error)
        try:
            for line in process.stdout:  # streamed: console records can be many
                record = history_record(line)
                if record is not None:
                    add_points(merged, *record)
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        errors.seek(0)
        lines = errors.read().decode(errors="replace").strip().splitlines()
    if process.returncode == 0:
        return merged, ""
    return merged, lines[-1] if lines else f"exit {process.returncode}"


def read_wandb_logs(runs: list[Path]) -> tuple[Series, list[Path], list[str]]:
    """A job's series from its W&B run folders (oldest first: a restarted run's later folder
    wins a step), the ``.wandb`` files read, and a problem per run that could not be read."""
    runs = [r for r in runs if any(r.glob("run-*.wandb"))]
    merged: Merged = {}
    problems = []
    for run in runs:
        history, error = read_wandb_history(run)
        for metric, points in history.items():
            merged.setdefault(metric, {}).update(points)
        if error:
            problems.append(f"{run.name}: {error}")
    return as_series(merged), [f for run in runs for f in run.glob("run-*.wandb")], problems
