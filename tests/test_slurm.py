"""Real sbatch jobs on a loopback SLURM cluster: the README's script, DDP, requeues."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.config import REPO, TINY
from tests.helpers.processes import finish, kill_group, reached_step, run_train, start_train
from tests.helpers.slurm_cluster import job_field, missing_binaries, slurm_cluster, wait_for_job

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(missing_binaries()) or os.geteuid() != 0,
        reason="needs root and Debian's slurm + munge (.ci/run installs them)",
    ),
]


def test_sbatch_srun_ddp_job_trains_into_one_job_folder(tmp_path, cache_dir):
    args = " ".join(
        [
            "trainer=multinode",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            *TINY,
            "logger=csv",
            "trainer.max_steps=3",
            "data.batches_per_epoch=3",
        ]
    )
    script = tmp_path / "train.sbatch"
    script.write_text(
        f"""#!/bin/bash
#SBATCH --nodes=1 --ntasks-per-node=2 --cpus-per-task=1
#SBATCH --output={tmp_path}/slurm-%j.out --requeue
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PBE_CACHE_DIR={cache_dir} PYTHONPATH={REPO} MASTER_ADDR=127.0.0.1
cd {tmp_path}
srun {sys.executable} {REPO}/train.py {args}
"""
    )
    with slurm_cluster(tmp_path / "cluster") as env:
        submitted = subprocess.run(
            ["sbatch", "--parsable", str(script)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        job_id = submitted.stdout.strip().split(";")[0]
        state = wait_for_job(job_id, env, timeout=300)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    runs = [p.name for p in (tmp_path / "outputs" / "train").iterdir()]
    assert runs == [f"slurm-{job_id}"], runs  # both tasks wrote into the job's folder
    assert (tmp_path / "outputs" / "train" / runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert "SLURM" in log or "world_size" in log or "distributed" in log.lower()


# -- preemption and time limits: requeued by the scheduler, resumed exactly ----------------

REQUEUED = [
    *TINY,
    "data.num_workers=2",
    "data.batches_per_epoch=5",
    "trainer.deterministic=true",
    "callbacks.checkpoint.every_n_train_steps=1000",
    "logger=wandb",
    "logger.wandb.offline=true",
]


def requeue_script(tmp_path: Path, cache_dir: Path, args: list[str], sbatch: str) -> Path:
    """The README's sbatch script, with the README's requeue signal, on one CPU task."""
    script = tmp_path / "train.sbatch"
    quoted = " ".join(f"'{a}'" for a in args)
    script.write_text(
        f"""#!/bin/bash
#SBATCH --nodes=1 --ntasks-per-node=1 --cpus-per-task=2 --requeue --open-mode=append
#SBATCH --output={tmp_path}/slurm-%j.out {sbatch}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PBE_CACHE_DIR={cache_dir} PYTHONPATH={REPO}
cd {tmp_path}
srun {sys.executable} {REPO}/train.py {quoted}
"""
    )
    return script


def submit(script: Path, env: dict) -> str:
    return submit_command([str(script)], env)


def submit_command(args: list[str], env: dict) -> str:
    """``sbatch ARGS``; returns the job id."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", *args], env=env, capture_output=True, text=True, check=True
    )
    return submitted.stdout.strip().split(";")[0]


def log_of(tmp_path: Path, job_id: str) -> str:
    path = tmp_path / f"slurm-{job_id}.out"
    return path.read_text()[-4000:] if path.is_file() else "(no job output)"


def assert_resumed_exactly(tmp_path: Path, job_id: str, env: dict, reference: dict) -> None:
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert job_field(job_id, env, "JobState") == "COMPLETED", log[-4000:]
    assert int(job_field(job_id, env, "Restarts") or 0) >= 1, log[-4000:]  # requeued by SLURM
    run_dir = tmp_path / "outputs" / "train" / f"slurm-{job_id}"
    assert "requeueing the job" in log and "resuming from" in log
    final = torch.load(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert final["global_step"] == reference["global_step"]
    for key, tensor in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], tensor), key
    run_id = (run_dir / "wandb_run_id").read_text().strip()  # one W&B run across requeues
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) >= 2 and all(r.name.endswith(f"-{run_id}") for r in runs)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(final: dict, reference: dict) -> None:
    assert final["global_step"] == reference["global_step"]
    for key, tensor in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], tensor), key


def uninterrupted(tmp_path: Path, cache_dir: Path, args: list[str]) -> dict:
    run_dir = tmp_path / "uninterrupted"
    assert run_train([*args, f"hydra.run.dir={run_dir}"], tmp_path, cache_dir).returncode == 0
    return load(run_dir / "checkpoints" / "last.ckpt")


def paced(seconds: float = 0.25) -> list[str]:
    """Slow steps (weights unchanged) that write the step reached into the run folder."""
    return [
        "+callbacks.pace._target_=tests.helpers.callbacks.Pace",
        "+callbacks.pace.dirpath=${paths.output_dir}",
        f"+callbacks.pace.seconds={seconds}",
    ]


def test_a_job_preempted_with_scancel_signal_is_requeued_and_resumes_exactly(tmp_path, cache_dir):
    args = [*REQUEUED, "trainer.max_steps=12"]
    reference = uninterrupted(tmp_path, cache_dir, args)
    script = requeue_script(tmp_path, cache_dir, [*args, *paced()], "")
    with slurm_cluster(tmp_path / "cluster") as env:
        job_id = submit(script, env)
        run_dir = tmp_path / "outputs" / "train" / f"slurm-{job_id}"
        deadline = time.time() + 180
        while reached_step(run_dir) < 4 and time.time() < deadline:
            state = job_field(job_id, env, "JobState")
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), log_of(tmp_path, job_id)
            time.sleep(0.1)
        assert reached_step(run_dir) >= 4, "the job never trained"
        # What a preempting scheduler or an operator sends: the requeue signal, to every step.
        subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True)
        wait_for_job(job_id, env, timeout=300)
        assert_resumed_exactly(tmp_path, job_id, env, reference)


def test_a_job_that_reaches_its_time_limit_is_requeued_and_resumes_exactly(tmp_path, cache_dir):
    # slurmctld checks time limits every 30 s and sends the warning signal up to 30 s before
    # it was asked for: USR2@60 on a 2-minute limit arrives 30-60 s after the start, while
    # this ~70 s run trains. The requeued run gets its own warning, so it may take 3 runs.
    args = [*REQUEUED, "trainer.max_steps=90"]
    reference = uninterrupted(tmp_path, cache_dir, args)
    script = requeue_script(tmp_path, cache_dir, [*args, *paced(0.5)], "--time=2 --signal=USR2@60")
    with slurm_cluster(tmp_path / "cluster") as env:
        job_id = submit(script, env)
        wait_for_job(job_id, env, timeout=600)
        assert_resumed_exactly(tmp_path, job_id, env, reference)


# The README's submitit launcher, on the loopback cluster's CPUs.
SUBMITIT = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.cpus_per_task=2",
    "hydra.launcher.timeout_min=10",
]


def test_a_submitit_launcher_job_preempted_with_its_signal_resumes_exactly(tmp_path, cache_dir):
    args = [*REQUEUED, "trainer.max_steps=12"]
    reference = uninterrupted(tmp_path, cache_dir, args)
    launcher = [*SUBMITIT, *paced()]
    with slurm_cluster(tmp_path / "cluster") as env:
        sweep = start_train(
            ["-m", *args, *launcher], tmp_path, cache_dir, SLURM_CONF=env["SLURM_CONF"]
        )
        try:
            deadline = time.time() + 180
            runs: list[Path] = []
            while not runs and time.time() < deadline:  # multirun/train/<sweep>/0
                runs = [
                    r for r in (tmp_path / "multirun").glob("train/*/0") if reached_step(r) >= 4
                ]
                time.sleep(0.2)
            assert runs, f"the submitted job never trained (launcher rc {sweep.poll()})"
            job_id = subprocess.run(
                ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True
            ).stdout.split()[0]  # the sweep's one array task, "<array job>_0"
            # What submitit asks SLURM for before the time limit, sent now by hand.
            subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True)
            result = finish(sweep, timeout=300)  # the launcher waits for the job's result
        finally:
            kill_group(sweep)
        assert result.returncode == 0, result.stderr[-3000:]
        assert int(job_field(job_id, env, "Restarts") or 0) >= 1
    assert_same_weights(load(runs[0] / "checkpoints" / "last.ckpt"), reference)
    # The submitting process summarised the sweep once the launcher had the job's result.
    summary = (runs[0].parent / "summary.md").read_text()
    assert summary.startswith("best on val/") and "1 finished" in summary


def test_a_bad_value_in_a_slurm_sweep_stops_it_before_anything_is_queued(tmp_path, cache_dir):
    sweep = ["-m", "seed=1,2,3", "ablation=bottleneck", "model.optimizer.lr=-1"]  # 12 jobs
    with slurm_cluster(tmp_path / "cluster") as env:
        result = run_train(
            [*sweep, *SUBMITIT, *TINY], tmp_path, cache_dir, SLURM_CONF=env["SLURM_CONF"]
        )
        # Nothing reached SLURM: the first job it is given now still gets its first id.
        probe = submit_command(["--wrap", "true"], env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: model.optimizer.lr=-1 must be a positive number: e.g. model.optimizer.lr=1e-5 "
        "(the paper's) (all 12 jobs)",
        "error: no job was started or queued (SlurmLauncher): the configs of the sweep's 12 "
        "jobs were checked here first. Fix the values above, then run the same command again "
        "(for paths only the compute nodes see, add ~hydra.callbacks.check_every_job)",
    ]
    assert probe == "1"
    assert not (tmp_path / "multirun").exists()  # not even submitit's folder
