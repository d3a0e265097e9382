"""A job's variant: its overrides (``<job>/.hydra/overrides.yaml``) whose value differs between
the jobs, e.g. ``data/mask=box``; the overrides all jobs share are left out."""

from __future__ import annotations

from pbe_lightning.sweeps.job import Job


def split_override(override: str) -> tuple[str, str]:
    """``+data/mask=box`` -> (``data/mask``, ``box``); ``~key`` -> (``key``, ``~``)."""
    text = override.lstrip("+")
    if text.startswith("~"):
        key, _, value = text[1:].partition("=")
        return key, "~" + value
    key, _, value = text.partition("=")
    return key, value


def name_variants(jobs: list[Job]) -> None:
    """Each job's variant: its overrides whose value is not the same in every job (all its
    overrides when it is the only job); the job's name is added to a variant shared."""
    values = [dict(split_override(o) for o in job.overrides) for job in jobs]
    keys = list(dict.fromkeys(key for job_values in values for key in job_values))
    if len(jobs) > 1:
        keys = [k for k in keys if len({v.get(k) for v in values}) > 1]
    for job, job_values in zip(jobs, values):
        parts = [f"{k}={job_values[k]}" for k in keys if k in job_values]
        job.variant = " ".join(parts) or f"job {job.name}"
    names = [job.variant for job in jobs]
    for job in jobs:
        if names.count(job.variant) > 1:
            job.variant += f" (job {job.name})"
