"""Scale out with config alone: torchrun across two 'nodes', every rank its own random draws
(exactly resumable), sweeps, SLURM launcher config."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.config import REPO, SMALL_SHARDS, TINY
from tests.helpers.draws import read_draws
from tests.helpers.processes import (
    finish,
    free_port,
    kill_group,
    run_train,
    start_train,
    wait_for_step,
)

SMALL = [
    *TINY,
    "logger=wandb_csv",
    "trainer.max_steps=3",
    "data.batches_per_epoch=3",
]


@pytest.mark.slow
def test_two_nodes_on_localhost_with_torchrun_share_one_run_dir(tmp_path, cache_dir):
    port = free_port()
    env = dict(os.environ, PBE_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO))
    counts = tmp_path / "counts"
    args = [
        "trainer=multinode",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        *SMALL,
        "logger=csv",
        "+callbacks.batch_counter._target_=tests.helpers.callbacks.BatchCounter",
        f"+callbacks.batch_counter.dirpath={counts}",
    ]

    def node(rank: int) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "--rdzv-id=pbe-test",
            str(REPO / "train.py"),
            *args,
        ]
        return subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    nodes = [node(0), node(1)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for process in nodes:  # a hung rank must not outlive the test
            kill_group(process)
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    records = [json.loads((counts / f"batches_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["batches"] == records[1]["batches"] == 3
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert [r.name for r in runs] == ["torchrun-pbe-test"]  # both nodes wrote into one folder
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_an_ablation_sweep_gives_grouped_wandb_runs_with_their_own_configs(tmp_path, cache_dir):
    args = [
        "-m",
        "ablation=mask",
        "data/mask=box,irregular",  # narrows the grid: two jobs
        *SMALL,
        "trainer.max_steps=2",
        "logger=wandb",
    ]
    result = run_train(args, cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((tmp_path / "multirun" / "train").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == ["0", "1"]
    configs = [yaml.safe_load((j / "config_resolved.yaml").read_text()) for j in jobs]
    assert [c["data"]["mask"]["irregular_prob"] for c in configs] == [0.0, 1.0]
    wandb = [c["logger"]["wandb"] for c in configs]
    assert wandb[0]["group"] == wandb[1]["group"] and wandb[0]["group"].startswith(
        "demo+ablation=mask/"
    )
    assert wandb[0]["tags"] == ["demo", "ablation=mask"]
    assert "data/mask=box" in wandb[0]["name"] and "data/mask=irregular" in wandb[1]["name"]
    for job in jobs:
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and (runs[0] / f"run-{runs[0].name.split('-')[-1]}.wandb").is_file()


def test_slurm_launcher_config_asks_for_requeue_and_one_task_per_gpu():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "hydra/launcher=slurm",
            "hydra.launcher.gpus_per_node=4",
            "--cfg",
            "hydra",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] in (4, "${.gpus_per_node}")
    assert launcher["additional_parameters"]["requeue"] is True and launcher["signal_delay_s"] > 0


def test_multinode_trainer_reads_the_launchers_topology(monkeypatch):
    from pbe_lightning.utils.resolvers import launcher_devices, launcher_nodes

    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert (launcher_nodes(), launcher_devices()) == (2, 8)
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x4)")
    assert (launcher_nodes(), launcher_devices()) == (4, 8)


def test_jobs_started_by_a_scheduler_resume_their_run_folder_by_default(monkeypatch):
    from pbe_lightning.utils.resolvers import resume_under_scheduler, run_id

    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # what a local torchrun-less run has
    assert resume_under_scheduler() is None  # a local run starts fresh in a new folder
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    assert (run_id(), resume_under_scheduler()) == ("slurm-812", "last")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "800")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")  # each array task keeps its own folder
    assert run_id() == "slurm-800_3"


# -- every rank its own draws ----------------------------------------------------------------

TWO_RANKS = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    *TINY,
    "trainer.max_steps=6",
    "data.batches_per_epoch=3",  # a validation between kill points
    "data.num_workers=2",  # two loader streams per rank
    "trainer.deterministic=true",
    "callbacks.checkpoint.every_n_train_steps=2",
    *SMALL_SHARDS,
]
DRAWS = ("t", "noise", "dropout_probe", "mask_probe", "reference_probe")


def recorded(run_dir: Path, *extra: str) -> list[str]:
    """tests/helpers/draws.py's probe of the draws each rank's steps really use."""
    return [
        "+callbacks.draws._target_=tests.helpers.draws.DrawRecorder",
        f"+callbacks.draws.dirpath={run_dir / 'draws'}",
        *extra,
    ]


def load_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, cache_dir, small_shards) -> Path:
    """An uninterrupted 2-rank run; rank 1's weights are changed before DDP wraps the model."""
    run_dir = tmp_path_factory.mktemp("two_ranks")
    args = [*TWO_RANKS, *recorded(run_dir, "+callbacks.draws.perturb_rank=1")]
    result = run_train([*args, f"hydra.run.dir={run_dir}"], run_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_every_rank_draws_its_own_noise_timesteps_dropout_masks_and_augmentation(two_ranks):
    zero, one = (read_draws(two_ranks / "draws", rank) for rank in (0, 1))
    assert sorted(zero) == sorted(one) == list(range(6))
    for step in range(6):
        for draw in DRAWS:
            assert zero[step][draw] != one[step][draw], f"{draw} at step {step}: same on both ranks"
    for draws in (zero, one):  # and every batch of a rank (both loader streams) anew
        for draw in DRAWS:
            assert len({str(record[draw]) for record in draws.values()}) == 6, draw
        # The steps drew nothing from the global generator (validations between them neither).
        assert len({record["global_rng"] for record in draws.values()}) == 1
    weights = [
        json.loads((two_ranks / "draws" / f"weights_rank{r}.json").read_text()) for r in (0, 1)
    ]
    assert weights[0]["built"] == weights[1]["built"]  # one seed, one initialisation
    # Rank 1's weights were changed before DDP wrapped the model: DDP handed it rank 0's.
    assert weights[1]["perturbed"] != weights[1]["built"]
    assert weights[0]["wrapped"] == weights[1]["wrapped"] == weights[0]["built"]
    assert weights[0]["global_rng"] != weights[1]["global_rng"]  # seeded per rank for training


@pytest.mark.slow
def test_two_ranks_killed_with_sigkill_resume_with_the_same_draws_and_weights(
    two_ranks, tmp_path, cache_dir
):
    run_dir = tmp_path / "killed"
    pace = [
        "+callbacks.pace._target_=tests.helpers.callbacks.Pace",
        f"+callbacks.pace.dirpath={run_dir}",
    ]
    args = [*TWO_RANKS, *recorded(run_dir), f"hydra.run.dir={run_dir}"]
    process = start_train([*args, *pace], tmp_path, cache_dir)
    wait_for_step(process, run_dir, 3)
    os.killpg(process.pid, signal.SIGKILL)  # both ranks and their loader workers, mid-run
    finish(process)
    assert 2 <= load_checkpoint(run_dir)["global_step"] < 6

    result = run_train([*args, "ckpt_path=last"], tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):  # the resumed steps drew what the uninterrupted run drew
        assert read_draws(run_dir / "draws", rank) == read_draws(two_ranks / "draws", rank)
    resumed, expected = load_checkpoint(run_dir), load_checkpoint(two_ranks)
    assert resumed["global_step"] == expected["global_step"] == 6
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
