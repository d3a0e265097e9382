"""A real sbatch job on a loopback SLURM cluster: the README's script, on CPU, 2 tasks."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY
from tests.slurm_cluster import missing_binaries, slurm_cluster, wait_for_job

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
            *[o for o in TINY if not o.startswith("logger")],
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
