"""The sweep's benchmark table: one row per variant and step, the evaluation's metrics
(``eval/fid_clip``, ``eval/qs``, ``eval/clip_score``, ...) beside what training logged at that
step (``val/*``) and the job's row of ``sweeps.summary`` (status, final and best values).

``eval_table.md`` leads with the best variant and step on the first metric the evaluations
report (``eval/fid_clip`` by default), then the table, the best of each column in bold;
``eval_table.csv`` holds the same rows unrounded with every column of the summary's row.
"""

from __future__ import annotations

import math
from pathlib import Path

from pbe_lightning.sweeps.checkpoints import Checkpoint
from pbe_lightning.sweeps.job import Job
from pbe_lightning.sweeps.table import better, direction, fmt, write_csv

PREFIX = "eval/"
AT_STEP = " at step"  # training's value of a metric at the checkpoint's step: "val/loss at step"


def value_at(job: Job, metric: str, step: int) -> float | None:
    """What training logged for ``metric`` after ``step`` steps; None when not then."""
    return next((value for done, value in job.series.get(metric, []) if done == step), None)


def eval_columns(reports: list[dict]) -> list[str]:
    """``eval/<metric>`` for every metric any report holds, in the reports' order."""
    names = dict.fromkeys(name for report in reports for name in report["metrics"])
    return [PREFIX + name for name in names]


def training_columns(jobs: list[Job]) -> list[str]:
    """The validation metrics training logged (``val/*``), sorted."""
    return sorted({m for job in jobs for m in job.series if m.startswith("val/")})


def eval_rows(
    evaluated: list[tuple[Checkpoint, dict]], summary_rows: dict[str, dict], jobs: list[Job]
) -> list[dict]:
    """One dict per evaluated checkpoint: the evaluation's numbers, training's at that step,
    then the job's summary row (``summary_rows``, by job name)."""
    columns = eval_columns([report for _, report in evaluated])
    logged = training_columns(jobs)
    rows = []
    for checkpoint, report in evaluated:
        job = checkpoint.job
        row = {"job": job.name, "variant": job.variant, "step": checkpoint.step}
        row |= {"status": job.status, "checkpoint": str(checkpoint.path)}
        row |= {c: report["metrics"].get(c.removeprefix(PREFIX)) for c in columns}
        row |= {m + AT_STEP: value_at(job, m, checkpoint.step) for m in logged}
        own = summary_rows.get(job.name, {})
        row |= {k: v for k, v in own.items() if k not in row and k not in ("job", "variant")}
        rows.append(row)
    return rows


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def mode(column: str) -> str:
    """``min`` or ``max``: the direction of the column's metric (``sweeps.table``)."""
    return direction(column.removesuffix(AT_STEP))


def best_row(rows: list[dict], column: str) -> dict | None:
    """The first row holding the column's best value; None when none holds a number."""
    candidates = [r for r in rows if finite(r.get(column))]
    if not candidates:
        return None
    return better(mode(column))(candidates, key=lambda r: r[column])


def headline(rows: list[dict], columns: list[str]) -> str:
    """The best variant and step on the first evaluation metric holding a number."""
    for column in columns:
        row = best_row(rows, column)
        if row is not None:
            return (
                f"best on {column} ({mode(column)}): {row['variant']} at step "
                f"{row['step']} ({fmt(row[column])})"
            )
    return "no evaluation metric holds a number (see each evaluation's metrics.json)"


def markdown(rows: list[dict], jobs: list[Job], sweep: Path) -> str:
    """eval_table.md: the headline, what the columns are, the table (the columns where some
    row holds a number: a metric every evaluation skipped is in the CSV only)."""

    def shown(names: list[str]) -> list[str]:
        return [c for c in names if any(finite(r[c]) for r in rows)]

    columns = shown([c for c in rows[0] if c.startswith(PREFIX)])
    logged = shown([m + AT_STEP for m in training_columns(jobs)])
    header = ["variant", "step", "status", *(f"{c} ({mode(c)})" for c in columns + logged)]
    winners = {c: best_row(rows, c) for c in columns + logged}
    lines = [
        headline(rows, columns),
        "",
        f"Sweep `{sweep}`: {len(rows)} checkpoints of {len(jobs)} jobs on the benchmark "
        "(eval/*), beside what training logged at the same step (val/*, on its preview). "
        "**bold**: the best of each column.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row["variant"].replace("|", "\\|"), str(row["step"]), row["status"]]
        for column in columns + logged:
            text = fmt(row[column]) if finite(row[column]) else ""
            cells.append(f"**{text}**" if text and winners[column] is row else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], jobs: list[Job], sweep: Path, out: Path) -> list[Path]:
    """eval_table.md and eval_table.csv in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "eval_table.md", out / "eval_table.csv"]
    files[0].write_text(markdown(rows, jobs, sweep))
    write_csv(rows, files[1])
    return files
