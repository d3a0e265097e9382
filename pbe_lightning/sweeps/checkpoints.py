"""The checkpoints of a sweep's jobs, one per global step: what the sweep evaluation paints.

A job's ``checkpoints/`` holds ``step_<N>.ckpt`` files and ``last.ckpt``, which repeats the
newest step (and moves on while the job runs): each step is evaluated once, from its
``step_*`` file when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pbe_lightning.sweeps.errors import SummaryError
from pbe_lightning.sweeps.job import Job
from pbe_lightning.utils.loggers import read_checkpoint

MOVING = "last.ckpt"  # rewritten as the job goes on: another file names a step for good


@dataclass(frozen=True)
class Checkpoint:
    job: Job
    path: Path
    step: int  # the global step it was saved at

    @property
    def folder_name(self) -> str:
        """Its evaluation's folder under the job's: named by step, whatever the file."""
        return f"step-{self.step}"


def global_step(path: Path) -> int:
    """The checkpoint's global step (tensors memory-mapped: nothing is copied)."""
    return int(read_checkpoint(path).get("global_step", 0))


def job_checkpoints(job: Job, pattern: str) -> list[Checkpoint]:
    """The job's checkpoints matching ``pattern``, one per step, by step."""
    by_step: dict[int, Checkpoint] = {}
    for path in sorted((job.path / "checkpoints").glob(pattern)):
        step = global_step(path)
        if step not in by_step or by_step[step].path.name == MOVING:
            by_step[step] = Checkpoint(job, path, step)
    return [by_step[step] for step in sorted(by_step)]


def sweep_checkpoints(jobs: list[Job], pattern: str) -> list[Checkpoint]:
    """Every job's checkpoints, job by job; an error when no job has one."""
    found = [c for job in jobs for c in job_checkpoints(job, pattern)]
    if not found:
        raise SummaryError(
            f"no checkpoint matches checkpoints/{pattern} in the sweep's {len(jobs)} jobs: wait "
            "for the first checkpoint (callbacks.checkpoint.every_n_train_steps), or pass "
            "another --checkpoints pattern"
        )
    return found
