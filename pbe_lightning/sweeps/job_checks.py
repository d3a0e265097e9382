"""Every job of a sweep checked where ``-m`` runs, before any job starts or is queued.

    python train.py -m hydra/launcher=slurm seed=1,2,3 ablation=bottleneck model.optimizer.lr=-1
    error: model.optimizer.lr=-1 must be a positive number: e.g. ... (all 12 jobs)
    error: no job was started or queued (SlurmLauncher): the configs of the sweep's 12 jobs ...

A problem only some jobs have names them by what sets them apart, e.g.
``(2 of 6 jobs: #4 (model.cfg_dropout=1.5,model.cfg_dropout_mode=per_sample), ...)``.

Hydra's basic sweeper only composes each batch before launching it, and ``train()`` checks its
config inside the job: under SLURM each job would queue, start, load and fail on its own, the
same mistake twelve times. :class:`CheckEveryJob` (a Hydra callback, ``hydra.callbacks`` in
``conf/hydra/default.yaml``) re-derives the jobs at ``on_multirun_start`` exactly as the basic
sweeper does (with its own ``BasicSweeper.split_arguments``: its grid ``hydra.sweeper.params``,
which ``ablation=`` sets, times the command line's comma lists), composes each job's config the
way the launchers do, and runs ``config_checks`` on it. Jobs SLURM runs elsewhere skip the one
check that counts this machine's GPUs. A callback rather than a sweeper subclass: Hydra loads sweepers only
from its ``hydra_plugins`` package, callbacks from anywhere, and another sweeper
(``hydra/sweeper=optuna``) keeps working; its adaptive jobs are checked inside each job.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

# Launchers whose jobs run on other machines: this machine's GPUs say nothing about theirs.
ELSEWHERE = ("SlurmLauncher",)
LISTED_JOBS = 4  # jobs named per problem; the rest are counted


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, in launch order, as the basic sweeper derives them: its grid
    (``hydra.sweeper.params``) then the command line, as a cartesian product."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def job_config(master: DictConfig, overrides: Sequence[str], number: int) -> DictConfig:
    """The config job ``number`` will get, as ``hydra.core.utils.run_job`` prepares it (its
    output folder included), and with Hydra's config of that job current, so that
    ``${hydra:...}`` and ``${pbe.*}`` resolve as they will in the job. Creates nothing."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    config = loader.load_sweep_config(master, list(overrides))
    with open_dict(config):
        config.hydra.job.num = number
        config.hydra.job.id = config.hydra.job.get("id") or f"check_{number}"
    HydraConfig.instance().set_config(config)
    output_dir = os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(config)
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def job_problems(
    master: DictConfig, overrides: Sequence[str], number: int, here: bool
) -> list[str]:
    """``config_checks``' problems of job ``number``; ``here=False`` (the job runs on another
    machine) leaves out the check that counts this machine's GPUs."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pbe_lightning.utils import config_checks

    checks = [c for c in config_checks.CHECKS if here or c is not config_checks.check_accelerator]
    try:
        config = job_config(master, overrides, number)
        return [line for check in checks for line in check(config)]
    except HydraException as error:  # a swept option that does not exist, ...
        return [f"the config cannot be composed: {str(error).splitlines()[0]}"]
    except OmegaConfBaseException as error:  # a value that cannot even be resolved
        return [f"the config cannot be resolved: {str(error).splitlines()[0]}"]


def varying(jobs: list[list[str]]) -> set[str]:
    """The override keys whose value differs between the jobs: what names a job."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return {key for key, seen in values.items() if len(seen) > 1}


def job_label(number: int, overrides: list[str], keys: set[str]) -> str:
    """``#3 (data/mask=box,seed=2)``: the job number and what sets it apart."""
    own = [o for o in overrides if o.partition("=")[0] in keys]
    return f"#{number} ({','.join(own)})" if own else f"#{number}"


def which_jobs(numbers: list[int], labels: list[str]) -> str:
    """``all 12 jobs`` or ``2 of 12 jobs: #1 (...), #3 (...)``, at most LISTED_JOBS named."""
    if len(numbers) == len(labels):
        return f"all {len(labels)} jobs" if len(labels) > 1 else labels[0]
    named = ", ".join(labels[n] for n in numbers[:LISTED_JOBS])
    more = f" and {len(numbers) - LISTED_JOBS} more" if len(numbers) > LISTED_JOBS else ""
    return f"{len(numbers)} of {len(labels)} jobs: {named}{more}"


def report(problems: dict[str, list[int]], labels: list[str], launcher: str) -> str:
    """The ``error:`` lines: each problem once, with the jobs that have it; then what to do."""
    lines = [f"error: {line} ({which_jobs(numbers, labels)})" for line, numbers in problems.items()]
    lines.append(
        f"error: no job was started or queued ({launcher}): the configs of the sweep's "
        f"{len(labels)} jobs were checked here first. Fix the values above, then run the same "
        "command again (for paths only the compute nodes see, add ~hydra.callbacks.check_every_job)"
    )
    return "\n".join(lines)


def launcher_name(config: DictConfig) -> str:
    target = str(OmegaConf.select(config, "hydra.launcher._target_") or "basic")
    return target.rsplit(".", 1)[-1]


def check_every_job(config: DictConfig) -> None:
    """Compose and check every job of the sweep ``config`` describes; ``SystemExit`` with the
    ``error:`` lines when any job has a problem (Hydra swallows a callback's exceptions)."""
    started = time.perf_counter()
    str(config.hydra.sweep.dir)  # resolve the sweep folder's stamp once: every job copies it
    jobs = sweep_jobs(config)
    keys, launcher = varying(jobs), launcher_name(config)
    here = launcher not in ELSEWHERE
    labels = [job_label(n, job, keys) for n, job in enumerate(jobs)]
    problems: dict[str, list[int]] = {}
    previous = HydraConfig.instance().cfg
    try:
        for number, overrides in enumerate(jobs):
            for line in job_problems(config, overrides, number, here):
                problems.setdefault(line, []).append(number)
    finally:
        HydraConfig.instance().cfg = previous
    elapsed = time.perf_counter() - started
    if problems:
        raise SystemExit(report(problems, labels, launcher))
    log.info("checked the configs of the sweep's %d jobs in %.1f s", len(jobs), elapsed)


class CheckEveryJob(Callback):
    """``hydra.callbacks``: check every job's config before the sweep launches any."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "task_name") != "train":
            return  # config_checks knows training configs; evaluate.py checks its own
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
        if sweeper.rsplit(".", 1)[-1] != "BasicSweeper":
            # Another sweeper (optuna, ...) chooses its jobs as it goes: each checks its own.
            log.info("jobs not checked before the sweep: %s picks them as it runs", sweeper)
            return
        check_every_job(config)
