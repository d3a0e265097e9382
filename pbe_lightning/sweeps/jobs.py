"""The jobs of a Hydra multirun folder (``python train.py -m ... ablation=NAME``): finding their
folders, and reading each into a :class:`Job`: overrides and variant, config (loggers, step
budget), metric series and status."""

from __future__ import annotations

from pathlib import Path

import yaml

from pbe_lightning.sweeps.errors import SummaryError
from pbe_lightning.sweeps.job import Job
from pbe_lightning.sweeps.logs import NO_CSV, read_csv_logs, read_wandb_logs
from pbe_lightning.sweeps.status import judge_status
from pbe_lightning.sweeps.variants import name_variants

EXAMPLE = "pass a sweep folder, multirun/train/<stamp>, the one `python train.py -m ...` writes"
NOT_JOBS = ("checkpoints", "wandb", "samples", "csv")  # a job's own folders, never searched
WANDB_NOTE = (
    "no CSV logs (logger=wandb_csv writes them): metrics read from its W&B run's .wandb "
    "log with `wandb leet inspect`"
)

# ---------------------------------------------------------------------------- finding


def job_number_order(relative: Path) -> tuple:
    """Sorts ``2`` before ``10``: numbers by value, other names after them."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in relative.parts)


def find_jobs(sweep: Path) -> list[Path]:
    """The job folders of a multirun folder: those holding ``.hydra/overrides.yaml``, found
    up to 3 levels down (``hydra.sweep.subdir`` may nest), in job-number order."""
    found, todo = [], [(sweep, 0)]
    while todo:
        folder, depth = todo.pop()
        for child in sorted(p for p in folder.iterdir() if p.is_dir()):
            if child.name.startswith(".") or (child / "multirun.yaml").is_file():
                continue  # another sweep's folder is not a job of this one
            if (child / ".hydra" / "overrides.yaml").is_file():
                found.append(child)
            elif depth < 2 and child.name not in NOT_JOBS:
                todo.append((child, depth + 1))
    return sorted(found, key=lambda path: job_number_order(path.relative_to(sweep)))


def no_jobs_error(sweep: Path, is_multirun: bool) -> SummaryError:
    """What a folder without jobs is instead: a sweep not started, a folder of sweeps, other."""
    if is_multirun:
        return SummaryError(
            f"{sweep} is a sweep with no jobs yet (no <job>/.hydra/overrides.yaml): wait for its "
            "first job to start, or read the launcher's logs (.submitit/ with hydra/launcher=slurm)"
        )
    sweeps = sorted(
        (p for p in sweep.iterdir() if (p / "multirun.yaml").is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    if sweeps:
        return SummaryError(
            f"{sweep} holds {len(sweeps)} sweep(s), not jobs: pass one of them, e.g. {sweeps[-1]}"
        )
    return SummaryError(
        f"{sweep} is not a Hydra multirun folder (no multirun.yaml, no "
        f"<job>/.hydra/overrides.yaml): {EXAMPLE}"
    )


def check_sweep_folder(sweep: Path) -> list[Path]:
    """The job folders of ``sweep``, or a :class:`SummaryError` saying what it is instead."""
    if not sweep.exists():
        raise SummaryError(f"{sweep} does not exist: {EXAMPLE}")
    if not sweep.is_dir():
        raise SummaryError(f"{sweep} is a file, not a folder: {EXAMPLE}")
    is_multirun = (sweep / "multirun.yaml").is_file()
    if not is_multirun and (sweep / ".hydra" / "overrides.yaml").is_file():
        raise SummaryError(
            f"{sweep} is a single run's folder, not a sweep: {EXAMPLE} "
            "(a run started without -m has no variants to compare)"
        )
    jobs = find_jobs(sweep)
    if not jobs:
        raise no_jobs_error(sweep, is_multirun)
    return jobs


# ---------------------------------------------------------------------------- reading


def read_overrides(path: Path) -> list[str]:
    try:
        overrides = yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()) or []
    except yaml.YAMLError:
        overrides = []
    return [str(o) for o in overrides]


def read_resolved_config(path: Path) -> dict | None:
    """The job's ``config_resolved.yaml``; None when missing or unreadable."""
    path = path / "config_resolved.yaml"
    try:
        cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def read_config(job: Job) -> None:
    """The resolved config's CSV/W&B loggers and step budget, when the job wrote one."""
    cfg = read_resolved_config(job.path)
    if cfg is None:
        return
    loggers = cfg.get("logger") or {}
    if isinstance(loggers, dict):
        targets = {k: str((v or {}).get("_target_", "")) for k, v in loggers.items()}
        job.csv_on = any(t.endswith("CSVLogger") for t in targets.values())
        wandb = [k for k, t in targets.items() if t.endswith("WandbLogger")]
        if wandb:
            job.wandb_group = loggers[wandb[0]].get("group")
    max_steps = (cfg.get("trainer") or {}).get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        job.max_steps = max_steps


def read_logs(job: Job) -> list[Path]:
    """Fills ``job.series`` from its CSV logs, else from its W&B runs (with a note saying so,
    or why there are none); returns the metric files read."""
    job.series, files = read_csv_logs(job.path)
    if job.series:
        job.source = "csv"
        return files
    if not job.wandb_runs:
        return files
    job.series, wandb_files, problems = read_wandb_logs(job.wandb_runs)
    if job.series:
        job.source = "wandb"
        job.note = WANDB_NOTE
    elif problems:
        job.note = f"{NO_CSV}; its W&B run could not be read here ({'; '.join(problems)})"
    return wandb_files or files


def read_job(sweep: Path, path: Path, now: float) -> Job:
    job = Job(path.relative_to(sweep).as_posix(), path, read_overrides(path))
    read_config(job)
    job.wandb_runs = sorted((path / "wandb").glob("*run-*")) if (path / "wandb").is_dir() else []
    files = read_logs(job)
    judge_status(job, files, now)
    return job


def read_jobs(sweep: Path, now: float) -> list[Job]:
    """Every job of the sweep folder, each with its variant; ``now`` judges which still run."""
    jobs = [read_job(sweep, path, now) for path in check_sweep_folder(sweep)]
    name_variants(jobs)
    return jobs
