"""Splitting evaluate.py's painting across processes and jobs, and scoring once.

Chunks are the unit: ``evaluate`` paints items in fixed chunks of ``batch_size`` by benchmark
index, chunk ``k`` seeded ``seed + its first index``, so whichever process paints a chunk paints
the same pixels (on the same hardware, library versions and, on CPUs, thread count). Two
levels split them:

- **processes of one job** (torchrun, ``srun``, the submitit launcher): read from the launcher's
  environment. They join one gloo process group, paint the chunks dealt to them round-robin
  (each on its ``LOCAL_RANK``'s GPU), meet at an ``all_reduce`` of their counts (a barrier:
  everything is painted), and rank 0 alone reads every edit back and scores it, exactly as a
  single process would.
- **independent jobs** (a SLURM array): ``shard=i shards=n`` gives job ``i`` the chunks ``k``
  with ``k % n == i``, dealt among its own processes as above. Such jobs share no process
  group and may not even run at the same time, so none of them scores: each paints and exits,
  and ``score_only=true`` in the same folder (a job that depends on the array) scores once
  every edit exists.

Every edit is a file written atomically, so an interrupted run (a process killed with
``kill -9``) is resumed by running the same command again: finished edits are skipped.

Why not Lightning's own pieces: Fabric's precision plugins refuse fp16 on CPUs (the paper's
precision, which evaluate keeps as its default) and Lightning's ``SLURMEnvironment`` counts
``SLURM_NTASKS``, which in a batch script without ``srun`` makes one process wait for others
that never start; the srun step's own counts (``SLURM_STEP_NUM_TASKS``) say what was started.
Its node-list parser and ``TorchElasticEnvironment`` are used as they are.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

log = logging.getLogger(__name__)
T = TypeVar("T")
PROCESS_KEYS = ("shard", "shards", "score_only", "wait_min")  # what never decides a pixel


@dataclass(frozen=True)
class Processes:
    """The processes a launcher started for one job: this one's place among them."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str = "none"  # torchrun | slurm | none
    address: str | None = None  # tcp://host:port under SLURM; torchrun's env:// otherwise


def slurm_port() -> int:
    """``MASTER_PORT``, else 15000 + the job id's last 4 digits (Lightning's rule for SLURM)."""
    if "MASTER_PORT" in os.environ:
        return int(os.environ["MASTER_PORT"])
    return 15000 + int(os.environ.get("SLURM_JOB_ID", "0")[-4:])


def launched_processes() -> Processes:
    """torchrun's (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else an srun step's
    (``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS``), else one process."""
    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
        return Processes(env.global_rank(), env.world_size(), env.local_rank(), "torchrun")
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if "SLURM_STEP_ID" in os.environ and tasks > 1:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST", "")
        host = os.environ.get("MASTER_ADDR") or SLURMEnvironment.resolve_root_node_address(nodes)
        rank, local = int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", "0"))
        return Processes(rank, tasks, local, "slurm", f"tcp://{host}:{slurm_port()}")
    return Processes()


def join_group(processes: Processes, wait_min: float) -> None:
    """Open the gloo group of ``processes`` (once per process: a sweep evaluates many
    checkpoints in one). gloo, also on GPUs: its only collective is a barrier on the host."""
    if processes.world == 1 or dist.is_initialized():
        return
    log.info(
        "evaluating as process %d of %d (%s): waiting for the others to join",
        processes.rank,
        processes.world,
        processes.launcher,
    )
    dist.init_process_group(
        "gloo",
        init_method=processes.address or "env://",
        rank=processes.rank,
        world_size=processes.world,
        timeout=timedelta(minutes=wait_min),
    )


@dataclass(frozen=True)
class Part:
    """What this process paints and whether it scores: its job's ``shard`` of ``shards``,
    dealt among the job's ``processes``."""

    shard: int
    shards: int
    processes: Processes

    @property
    def scores(self) -> bool:
        """Rank 0 of a job that holds every chunk; an array's jobs leave it to score_only."""
        return self.shards == 1 and self.processes.rank == 0

    def chunks(self, chunks: list[list[T]]) -> list[list[T]]:
        """This process's chunks, in order: its shard's (``k % shards``), then every
        ``world``-th of those from ``rank`` on."""
        mine = chunks[self.shard :: self.shards]
        return mine[self.processes.rank :: self.processes.world]

    def device(self, requested: str) -> torch.device:
        """``auto``/``cuda``: the GPU of this process's ``LOCAL_RANK``; anything else as given."""
        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", self.processes.local_rank % torch.cuda.device_count())
        return torch.device("cpu" if requested == "auto" else requested)

    def total(self, count: int) -> int:
        """The sum of ``count`` over the job's processes, once every one has finished
        painting: the barrier before rank 0 scores."""
        if self.processes.world == 1:
            return count
        summed = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(summed)
        return int(summed.item())


def this_part(shard: int, shards: int, wait_min: float) -> Part:
    """This process's part, its process group joined when several processes run."""
    processes = launched_processes()
    join_group(processes, wait_min)
    return Part(shard, shards, processes)


def missing_edits_error(missing: list[Path], total: int, folder: Path) -> FileNotFoundError:
    names = ", ".join(p.name for p in missing[:3])
    return FileNotFoundError(
        f"{len(missing)} of {total} edits are not in {folder} (e.g. {names}): paint them first "
        "(run the painting job(s) again with the same settings: finished edits are kept), then "
        "score"
    )


def check_painted(edits: list[Path], folder: Path) -> None:
    """Every edit exists before scoring; otherwise an error saying how many and what to do."""
    missing = [path for path in edits if not path.is_file()]
    if missing:
        raise missing_edits_error(missing, len(edits), folder)


def score_command(argv: list[str] | None = None) -> str:
    """This command line with ``score_only=true`` in place of the shard keys."""
    argv = list(sys.argv if argv is None else argv)
    kept = [a for a in argv[1:] if a.partition("=")[0].lstrip("+") not in PROCESS_KEYS]
    return shlex.join(["python", Path(argv[0]).name, *kept, "score_only=true"])


def part_report(part: Part, painted: int, folder: Path) -> dict:
    """What a process that does not score returns: the edits painted (by its whole job, once
    every process of it has finished). A job of an array also says how to score them all."""
    if part.shards > 1 and part.processes.rank == 0:
        log.info(
            "shard %d of %d: %d edits painted into %s; once every shard has finished, score "
            "them all with: %s",
            part.shard,
            part.shards,
            painted,
            folder,
            score_command(),
        )
    return {"shard": part.shard, "shards": part.shards, "painted_this_run": painted}


def folder_named(hydra_overrides: list[str]) -> bool:
    """Whether the command line names the output folder (``hydra.run.dir``, or with ``-m``
    ``hydra.sweep.subdir``, which the jobs of a sweep would otherwise number apart)."""
    keys = {o.partition("=")[0].lstrip("+") for o in hydra_overrides}
    return bool(keys & {"hydra.run.dir", "hydra.sweep.subdir"})


def shared_folder_problem(shards: object, score_only: object) -> str | None:
    """Jobs of an array and the scoring job must meet in one folder that the command line
    names: the default one is named after each job's own id. Checked only under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    splits = isinstance(shards, int) and shards > 1
    if not (splits or score_only is True) or not HydraConfig.initialized():
        return None
    if folder_named(list(HydraConfig.get().overrides.hydra)):
        return None
    what = f"shards={shards}: the jobs" if splits else "score_only=true: the painting job(s)"
    return (
        f"{what} and the scoring step must use one folder: pass "
        "hydra.run.dir=outputs/eval/<name>, the same in every job"
    )
