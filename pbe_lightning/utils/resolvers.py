"""OmegaConf resolvers: cluster topology read from the launcher's environment; W&B names, tags
and groups read from Hydra (the overrides, the experiment and ablation chosen).

``trainer=multinode`` must agree with what torchrun or SLURM actually started; reading the
numbers from their environment means one config serves every job size.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from pbe_lightning.utils.overrides import split_top_level


def launcher_nodes(default: int = 1) -> int:
    """Nodes in this job: torchrun (WORLD_SIZE / LOCAL_WORLD_SIZE) or SLURM (SLURM_NNODES)."""
    if "LOCAL_WORLD_SIZE" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
    if "SLURM_NNODES" in os.environ:
        return int(os.environ["SLURM_NNODES"])
    return int(default)


def launcher_devices(default: int | str = "auto") -> int | str:
    """Processes per node: torchrun's LOCAL_WORLD_SIZE or SLURM's tasks per node."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if tasks:
        return int(tasks.split("(")[0].split(",")[0])  # "2(x4)" or "2,1": first node's count
    return default


def _hydra_config():
    return HydraConfig.get() if HydraConfig.initialized() else None


def selection() -> list[str]:
    """What this run is: the experiment (recipe) and, when set, the ablation (sweep grid),
    e.g. ``["paper", "ablation=mask"]``; empty outside Hydra."""
    hydra = _hydra_config()
    if hydra is None:
        return []
    experiment = hydra.runtime.choices.get("experiment")
    ablation = hydra.runtime.choices.get("ablation")
    names = [str(experiment)] if experiment else []
    return names + [f"ablation={ablation}"] if ablation else names


def run_tags() -> ListConfig:
    """W&B tags: :func:`selection`. A config list, not a Python one: ``OmegaConf.resolve``
    (``train.py --cfg job --resolve``) cannot store a plain list in a node."""
    return OmegaConf.create(selection())


NAME_VALUE_LIMIT = 24  # longer override values (paths, lists) would drown the name


def run_name() -> str | None:
    """A run named by what it changes (``data/mask=box,seed=2``); None lets W&B pick.

    In a sweep, by what varies between its runs (the ablation grid's keys and the command
    line's comma lists): the runs of a group differ there, the rest is shared. Otherwise
    Hydra's ``override_dirname`` less paths and long values: ``data.shards=/abs/...`` says
    nothing in a run list (the config holds it), and W&B truncates long names anyway.
    """
    hydra = _hydra_config()
    if hydra is None:
        return None
    overrides = sorted(hydra.overrides.task)
    if str(hydra.mode) == "RunMode.MULTIRUN":
        swept = swept_keys(hydra)
        varying = [o for o in overrides if o.partition("=")[0].lstrip("+~") in swept]
        if varying:
            return ",".join(varying)
    excluded = set(hydra.job.config.override_dirname.exclude_keys)
    parts = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") in excluded or "/" in value or len(value) > NAME_VALUE_LIMIT:
            continue
        parts.append(override)
    return ",".join(parts) or None


def swept_keys(hydra: DictConfig) -> set[str]:
    """The keys a multirun sweeps: its sweeper's grid (``ablation=...``) and the command
    line's ``key=a,b`` (read from ``sys.argv``: Hydra keeps only each job's own values)."""
    keys = set(OmegaConf.select(hydra, "sweeper.params", default=None) or {})
    for argument in sys.argv[1:]:
        key, sep, value = argument.partition("=")
        if sep and len(split_top_level(value)) > 1 and not value.startswith(("[", "{")):
            keys.add(key.lstrip("+~"))
    return keys


def sweep_group() -> str | None:
    """All runs of one multirun share a W&B group: experiment + ablation + sweep folder,
    e.g. ``paper+ablation=mask/2025-01-31_12-00-00``."""
    hydra = _hydra_config()
    if hydra is None or str(hydra.mode) != "RunMode.MULTIRUN":
        return None
    return "+".join(selection() or ["sweep"]) + "/" + os.path.basename(hydra.sweep.dir)


def run_id() -> str | None:
    """The launcher's job id: every node of one job then writes into one run folder, and a
    requeued or restarted job (same id) finds its own checkpoints there."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return "slurm-" + os.environ["SLURM_JOB_ID"]
    if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return "torchrun-" + os.environ["TORCHELASTIC_RUN_ID"]
    return None


def run_stamp() -> str:
    """Run folder name: the launcher's job id when there is one, else the start time."""
    return run_id() or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def resume_under_scheduler() -> str | None:
    """Default ``ckpt_path``: ``last`` when SLURM or torchrun started us, since a requeued or
    restarted job runs the same command in the same run folder; nothing for a local run."""
    return "last" if run_id() else None


def register() -> None:
    for name, function in {
        "pbe.nodes": launcher_nodes,
        "pbe.devices": launcher_devices,
        "pbe.tags": run_tags,
        "pbe.run_name": run_name,
        "pbe.sweep_group": sweep_group,
        "pbe.run_stamp": run_stamp,
        "pbe.resume_under_scheduler": resume_under_scheduler,
    }.items():
        # Cached: a folder name must not change between two reads in one process.
        OmegaConf.register_new_resolver(
            name, function, replace=True, use_cache=name == "pbe.run_stamp"
        )


register()
