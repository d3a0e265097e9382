"""SLURM: our requeue instead of Lightning's, after everything is written.

Lightning's auto-requeue saves ``hpc_ckpt_*.ckpt`` from inside the signal handler (mid-step)
and runs ``scontrol requeue`` before the loggers close; requeueing a running job makes SLURM
kill it, so anything still being written is lost. ``callbacks/preemption.py`` saves at the
step boundary, ``train.py`` closes the loggers, and only then is the job requeued.
"""

from __future__ import annotations

import logging
import os
import subprocess

from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its own requeue handler."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def job_id() -> str | None:
    """This job's id as ``scontrol`` takes it (``<array job>_<task>`` for array jobs)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_job() -> bool:
    """``scontrol requeue`` this job; it restarts later with the same id and run folder."""
    job = job_id()
    if job is None:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error(
            "could not requeue SLURM job %s (%s): resubmit it; it resumes from last.ckpt",
            job,
            result.stderr.strip(),
        )
        return False
    log.warning("requeued SLURM job %s: it resumes from last.ckpt when it restarts", job)
    return True
