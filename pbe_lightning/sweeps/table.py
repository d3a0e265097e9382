"""The numbers of a summary: which metric to rank on and in which direction, the best point of
a run, the winning job, and the rows of summary.csv and of summary.md's table.

The default metric is ``val/fid_clip`` when a job logs it, else ``val/loss``; the direction
comes from the name (losses, FID: lower is better; CLIP score, QS: higher is better) unless
the user gives one. The best value of a run is the best over its steps; the variants are
ranked on it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

from pbe_lightning.sweeps.errors import SummaryError
from pbe_lightning.sweeps.job import Job

DEFAULT_METRICS = ("val/fid_clip", "val/loss")  # the first one any job logs
HIGHER_IS_BETTER = (
    "clip_score", "qs", "score", "acc", "accuracy", "psnr", "ssim", "following",  # *_following
)

Point = tuple[int, float]  # (steps done, value)

# ---------------------------------------------------------------------------- metrics


def direction(metric: str) -> str:
    """``min`` or ``max`` from the metric's name: losses and FID down, scores up."""
    name = metric.rsplit("/", 1)[-1].lower()
    return "max" if any(name == h or name.endswith("_" + h) for h in HIGHER_IS_BETTER) else "min"


def better(mode: str) -> Callable:
    """``min`` or ``max``: both keep the first of a tie."""
    return min if mode == "min" else max


def logged_metrics(jobs: list[Job]) -> set[str]:
    return {m for job in jobs for m in job.series}


def no_metrics_error(jobs: list[Job]) -> SummaryError:
    """Why no job has a metric: the CSV logger was off, or none has logged one yet."""
    if all(not j.csv_on for j in jobs):
        return SummaryError(
            f"none of the {len(jobs)} jobs has CSV logs (the CSV logger was off): run the "
            "sweep with logger=wandb_csv (W&B + CSV) or logger=csv, or compare the runs in "
            "W&B's group view"
        )
    counts = {s: sum(j.status == s for j in jobs) for s in ("failed", "running", "unknown")}
    detail = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return SummaryError(
        f"none of the {len(jobs)} jobs has logged metrics yet ({detail or 'none finished'}): "
        "wait for a validation step, or read the jobs' train.log"
    )


def choose_metric(jobs: list[Job], metric: str | None) -> str:
    """The metric to rank on: the one asked for, else the default the jobs log."""
    present = sorted(logged_metrics(jobs))
    if not present:
        raise no_metrics_error(jobs)
    if metric is None:
        fallback = next((m for m in present if m.startswith("val/")), present[0])
        return next((m for m in DEFAULT_METRICS if m in present), fallback)
    if metric not in present:
        raise SummaryError(
            f"unknown metric {metric}: the jobs log {', '.join(present)}; pass one of them "
            "with --metric"
        )
    return metric


def metric_columns(jobs: list[Job], metric: str) -> list[str]:
    """The metrics shown: the ranked one, the other ``val/*`` ones, then ``train/loss``."""
    present = logged_metrics(jobs)
    others = sorted(m for m in present if m.startswith("val/") and m != metric)
    return [metric, *others, *(["train/loss"] if "train/loss" in present - {metric} else [])]


def best_point(points: list[Point], mode: str) -> Point | None:
    finite = [p for p in points if math.isfinite(p[1])]
    if not finite:
        return None
    return better(mode)(finite, key=lambda p: p[1])  # the earliest step of a tie


def best_job(jobs: list[Job], metric: str, mode: str) -> tuple[Job, Point] | None:
    """The job with the best value of ``metric`` over its steps (the first job of a tie), and
    that point; None when no job logged a finite value."""
    ranked = [(j, best_point(j.series.get(metric, []), mode)) for j in jobs]
    ranked = [(j, p) for j, p in ranked if p is not None]
    return better(mode)(ranked, key=lambda r: r[1][1]) if ranked else None


# ---------------------------------------------------------------------------- rows


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def metric_cells(points: list[Point], metric: str, mode: str) -> dict:
    """A job's final and best value of one metric, with their steps (None when not logged)."""
    final = points[-1] if points else None
    best = best_point(points, mode)
    return {
        f"{metric} final": final[1] if final else None,
        f"{metric} final step": final[0] if final else None,
        f"{metric} best": best[1] if best else None,
        f"{metric} best step": best[0] if best else None,
    }


def table_rows(jobs: list[Job], metrics: list[str], modes: dict[str, str]) -> list[dict]:
    """One dict per job: the numbers of summary.csv (None where a job lacks a metric)."""
    rows = []
    for job in jobs:
        row = {
            "job": job.name,
            "variant": job.variant,
            "status": job.status,
            "steps": job.steps,
            "max_steps": job.max_steps,
        }
        for metric in metrics:
            row.update(metric_cells(job.series.get(metric, []), metric, modes[metric]))
        row["note"] = job.note
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def column_winners(rows: list[dict], metrics: list[str], modes: dict[str, str]) -> dict:
    """Column -> the best value among the jobs, for the columns where two or more compete."""
    winners = {}
    for metric in metrics:
        for column in (f"{metric} final", f"{metric} best"):
            finite = [r[column] for r in rows if r[column] is not None and math.isfinite(r[column])]
            if len(finite) > 1:
                winners[column] = better(modes[metric])(finite)
    return winners


def steps_cell(row: dict) -> str:
    """``4/4``: steps done out of the budget; ``4`` when the budget is unknown."""
    steps = "" if row["steps"] is None else str(row["steps"])
    if row["max_steps"] and row["steps"] is not None:
        steps += f"/{row['max_steps']}"
    return steps


def value_cell(row: dict, column: str, winner: float | None) -> str:
    """``0.3 @2``: the value at its step, in bold when it is the column's best."""
    value = row[column]
    if value is None:
        return ""
    text = f"{fmt(value)} @{row[f'{column} step']}"
    return f"**{text}**" if value == winner else text


def markdown_table(rows: list[dict], metrics: list[str], modes: dict[str, str]) -> list[str]:
    header = ["variant", "status", "steps"]
    for metric in metrics:
        header += [f"{metric} final", f"{metric} best ({modes[metric]})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    winners = column_winners(rows, metrics, modes)
    for row in rows:
        cells = [row["variant"].replace("|", "\\|"), row["status"], steps_cell(row)]
        for metric in metrics:
            for column in (f"{metric} final", f"{metric} best"):
                cells.append(value_cell(row, column, winners.get(column)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
