"""A job's status, from its ``train.log``, its metrics and their files' age, with a note:

- ``finished``: Lightning's "max_steps reached", or the last step is ``trainer.max_steps``;
- ``running``: metrics written in the last ``RUNNING_WITHIN_S``;
- ``stopped``: a shutdown signal saved it, or no write for longer (killed or crashed);
- ``failed``: no metrics, not finished;
- ``unknown``: W&B only, unreadable here, not finished.
"""

from __future__ import annotations

import re
from pathlib import Path

from pbe_lightning.sweeps.job import Job
from pbe_lightning.sweeps.logs import NO_CSV

RUNNING_WITHIN_S = 30 * 60  # metrics written this recently: the job is taken to be running
FINISHED = re.compile(r"`Trainer\.fit` stopped: `max_(steps|epochs)=\d+` reached")
RETURNED = "finished in "  # pbe_lightning.train's last line, also after a shutdown signal
NOT_STARTED = "not starting "  # pbe_lightning.train: a signal stopped the sweep before this job
ATTEMPT = re.compile(r"GPU available: |resuming from ")  # each start of a job writes one


def log_tail(path: Path, size: int = 256 * 1024) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as stream:
        stream.seek(max(0, path.stat().st_size - size))
        return stream.read().decode(errors="replace")


def latest_attempt(log: str) -> str:
    """What the latest start of a job wrote (a resumed job's log holds every start)."""
    starts = [m.start() for m in ATTEMPT.finditer(log)]
    return log[starts[-1] :] if starts else log


def age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def at_step(job: Job) -> str:
    """``step 2 of 4``, or ``step 2`` when the step budget is unknown."""
    return f"step {job.steps}" + (f" of {job.max_steps}" if job.max_steps else "")


def reached_max_steps(job: Job, log: str) -> bool:
    steps = job.steps
    return bool(FINISHED.search(log)) or bool(steps and job.max_steps and steps >= job.max_steps)


def running_or_stopped(job: Job, files: list[Path], now: float) -> tuple[str, str]:
    """A job with metrics and no end in its log: running when they were written lately."""
    quiet = now - max(p.stat().st_mtime for p in files)
    if quiet < RUNNING_WITHIN_S:
        return "running", f"at {at_step(job)}, last metrics {age(quiet)} ago"
    return "stopped", (
        f"no metrics for {age(quiet)} at {at_step(job)}: killed or crashed? "
        f"see {job.name}/train.log"
    )


def judge_status(job: Job, files: list[Path], now: float) -> None:
    """Sets ``job.status`` and adds to ``job.note`` what it rests on; ``files``: the metric
    files read, whose modification times tell a running job from a stopped one."""
    log = latest_attempt(log_tail(job.path / "train.log"))
    if job.note:
        notes = [job.note]
    elif not job.series:
        notes = [NO_CSV if not job.csv_on else "no val/* or train/loss rows logged yet"]
    else:
        notes = []
    if reached_max_steps(job, log):
        job.status = "finished"
    elif NOT_STARTED in log:
        job.status, notes = "stopped", ["not started: a shutdown signal stopped the sweep first"]
    elif RETURNED in log:
        job.status = "stopped"
        notes.append(f"stopped by a shutdown signal at {at_step(job)}; last.ckpt was saved")
    elif job.series:
        job.status, note = running_or_stopped(job, files, now)
        notes.append(note)
    elif not files and not job.csv_on:
        job.status = "unknown"  # W&B only, still running or stopped: nothing here says which
    else:
        job.status = "failed"
        notes = [f"failed: no metrics; see {job.name}/train.log and the sweep's console output"]
    job.note = "; ".join(notes)
