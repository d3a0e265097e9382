"""Summarise a sweep: which variant won, with the numbers and the curves.

    python -m pbe_lightning.sweeps.summary multirun/train/<stamp> [--metric val/loss]
        [--mode min|max] [--out DIR]

Reads every job of a Hydra multirun folder (``python train.py -m ... ablation=NAME``): its
variant, metrics and status (``sweeps.jobs``). Writes into the sweep folder (or ``--out``):
``summary.md`` (a line naming the best variant on the chosen metric, then a table: variant,
status, steps, final and best value of each metric, the best of each column in bold),
``summary.csv`` (the same numbers, unrounded) and ``summary.png`` (one panel per metric, a line
per variant, over steps). Prints the table and the paths.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pbe_lightning.sweeps.errors import SummaryError
from pbe_lightning.sweeps.job import Job
from pbe_lightning.sweeps.jobs import read_jobs
from pbe_lightning.sweeps.plot import save_plot
from pbe_lightning.sweeps.table import (
    Point,
    best_job,
    choose_metric,
    direction,
    fmt,
    markdown_table,
    metric_columns,
    table_rows,
    write_csv,
)

STATUSES = ("finished", "running", "stopped", "failed", "unknown")


@dataclass
class Summary:
    sweep: Path
    jobs: list[Job]
    metric: str
    mode: str
    metrics: list[str]  # columns, the chosen metric first
    best: Job | None
    headline: str
    markdown: str
    files: list[Path]


# ---------------------------------------------------------------------------- summary.md


def headline(metric: str, mode: str, winner: tuple[Job, Point] | None) -> str:
    """summary.md's first line: the best variant on ``metric``, its value and step."""
    if winner is None:
        return f"best on {metric} ({mode}): none (no finite value logged)"
    job, (step, value) = winner
    unfinished = "" if job.status == "finished" else f", {job.status}"
    return f"best on {metric} ({mode}): {job.variant} ({fmt(value)} at step {step}{unfinished})"


def overview(sweep: Path, jobs: list[Job]) -> str:
    """The jobs counted by status, and how to read the table."""
    counts = ", ".join(f"{n} {s}" for s in STATUSES if (n := sum(j.status == s for j in jobs)))
    wandb = any(j.source == "wandb" for j in jobs)
    return (
        f"Sweep `{sweep}`: {len(jobs)} job{'s' if len(jobs) > 1 else ''}, {counts}. "
        "Best = the best value over a run's steps (@ step); **bold**: the best of each column. "
        "Source: each job's csv/version_*/metrics.csv"
        + (", else its W&B run's .wandb log." if wandb else ".")
    )


def wandb_pointer(sweep: Path, jobs: list[Job]) -> list[str]:
    """Where W&B compares the same runs, when the jobs logged to it."""
    groups = sorted({j.wandb_group for j in jobs if j.wandb_group})
    if not groups:
        return []
    more = f" (and {len(groups) - 1} more)" if len(groups) > 1 else ""
    return [
        f"W&B: group `{groups[0]}`{more} compares the same runs online; offline runs: "
        f"`wandb sync {sweep}/*/wandb/offline-run-*`."
    ]


def markdown(sweep: Path, jobs: list[Job], first_line: str, table: list[str]) -> str:
    """summary.md: the headline, the overview, the table, the jobs' notes, W&B's group."""
    lines = [first_line, "", overview(sweep, jobs), "", *table]
    notes = [f"- {j.name} ({j.variant}): {j.note}" for j in jobs if j.note]
    if notes:
        lines += ["", *notes]
    pointer = wandb_pointer(sweep, jobs)
    if pointer:
        lines += ["", *pointer]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the command


def summarise(
    sweep: str | Path, metric: str | None = None, mode: str | None = None, out=None
) -> Summary:
    """Reads the sweep, writes summary.md/.csv/.png into ``out`` (default: the sweep folder)."""
    sweep = Path(sweep)
    jobs = read_jobs(sweep, time.time())
    metric = choose_metric(jobs, metric)
    metrics = metric_columns(jobs, metric)
    modes = {m: direction(m) for m in metrics}
    modes[metric] = mode or modes[metric]
    winner = best_job(jobs, metric, modes[metric])
    first_line = headline(metric, modes[metric], winner)
    rows = table_rows(jobs, metrics, modes)
    text = markdown(sweep, jobs, first_line, markdown_table(rows, metrics, modes))

    out = Path(out) if out is not None else sweep
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "summary.md", out / "summary.csv", out / "summary.png"]
    files[0].write_text(text)
    write_csv(rows, files[1])
    save_plot(jobs, metrics, modes, files[2])
    best = winner[0] if winner else None
    return Summary(sweep, jobs, metric, modes[metric], metrics, best, first_line, text, files)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pbe_lightning.sweeps.summary",
        description="Summarise a sweep (python train.py -m ... ablation=NAME): the best "
        "variant, a table and curves of every job's metrics.",
    )
    parser.add_argument("sweep", help="the multirun folder, multirun/train/<stamp>")
    parser.add_argument(
        "--metric", help="what to rank on (default: val/fid_clip when logged, else val/loss)"
    )
    parser.add_argument(
        "--mode", choices=("min", "max"), help="lower or higher is better (default: by name)"
    )
    parser.add_argument("--out", help="where to write summary.md/.csv/.png (default: SWEEP)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Summary:
    args = parse_args(argv)
    try:
        summary = summarise(args.sweep, args.metric, args.mode, args.out)
    except SummaryError as error:
        raise SystemExit(f"error: {error}") from None
    print(summary.markdown)
    print("wrote " + ", ".join(str(p) for p in summary.files))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
