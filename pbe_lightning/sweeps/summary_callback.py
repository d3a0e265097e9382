"""A sweep summarises itself when it ends: summary.md/.csv/.png in its folder.

:class:`SummariseSweep` (a Hydra callback, ``hydra.callbacks`` in ``conf/hydra/default.yaml``)
runs ``pbe_lightning.sweeps.summary`` on the sweep folder where ``-m`` runs. Under the submitit
launchers (``hydra/launcher=slurm``) that is the submitting machine, once every job has
returned: the launcher waits for the jobs' results, so the summary sees them finished.

Hydra calls ``on_multirun_end`` only when every job succeeded; a failed job ends the sweep with
its error (and under SLURM the other jobs may still run). The summary is then written when the
process exits, with what there is. Summarising never fails the sweep: a problem is a warning
with the command to run by hand, the same command that updates the summary of a sweep whose
jobs still run.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def summary_command(sweep: Path) -> str:
    return f"python -m pbe_lightning.sweeps.summary {sweep}"


def has_jobs(sweep: Path) -> bool:
    """Whether any job of the sweep has started (a job folder holds ``.hydra/``)."""
    return sweep.is_dir() and any(sweep.glob("*/.hydra/overrides.yaml"))


def summarise_quietly(sweep: Path, metric: str | None = None, mode: str | None = None) -> bool:
    """Writes the sweep's summary and logs where; on any problem, a warning naming the command
    to run by hand instead. Returns whether the summary was written."""
    from pbe_lightning.sweeps.summary import summarise

    command = summary_command(sweep)
    try:
        summary = summarise(sweep, metric, mode)
    except Exception as error:  # a summary is a convenience: the sweep's result stands
        log.warning(
            "could not summarise the sweep (%s: %s): run `%s` by hand",
            type(error).__name__,
            error,
            command,
        )
        return False
    names = ", ".join(p.name for p in summary.files[1:])
    log.info(
        "sweep summary: %s\n  %s (and %s)\n  `%s` updates it, also while jobs still run",
        summary.headline,
        summary.files[0],
        names,
        command,
    )
    return True


class SummariseSweep(Callback):
    """``hydra.callbacks``: write the sweep's summary when it ends (see the module docstring).

    ``metric``/``mode``: what to rank on, as the command's ``--metric``/``--mode`` (default:
    ``val/fid_clip`` when logged, else ``val/loss``, minimised)."""

    def __init__(self, metric: str | None = None, mode: str | None = None) -> None:
        self.metric = metric
        self.mode = mode
        self.sweep: Path | None = None
        self.written = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "task_name") != "train":
            return  # the summary reads training runs' metrics
        self.sweep = Path(str(config.hydra.sweep.dir))
        self.written = False
        atexit.register(self.after_a_failed_job)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep is not None:
            self.summarise(self.sweep)

    def after_a_failed_job(self) -> None:
        """At exit, when ``on_multirun_end`` never came: a job failed and ended the sweep."""
        if self.written or self.sweep is None or not has_jobs(self.sweep):
            return  # summarised already, or stopped before any job started (a config check)
        log.warning("the sweep ended early: summarising what its jobs wrote")
        self.summarise(self.sweep)

    def summarise(self, sweep: Path) -> None:
        self.written = True
        summarise_quietly(sweep, self.metric, self.mode)
