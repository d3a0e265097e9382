"""OmegaConf resolvers: cluster topology read from the launcher's environment.

``trainer=multinode`` must agree with what torchrun or SLURM actually started; reading the
numbers from their environment means one config serves every job size.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf


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
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE")
    if tasks:
        return int(tasks.split("(")[0])
    return default


def register() -> None:
    OmegaConf.register_new_resolver("pbe.nodes", launcher_nodes, replace=True)
    OmegaConf.register_new_resolver("pbe.devices", launcher_devices, replace=True)


register()
