"""A real one-node SLURM cluster on loopback (slurmctld + slurmd + munge), for tests.

Needs Debian's slurmctld, slurmd, slurm-client and munge (``.ci/run`` installs them) and root.
Everything lives in a temporary folder; the daemons are stopped by their PID files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.helpers.processes import free_port  # clusters of tests side by side never meet

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "munged")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _write_conf(root: Path, host: str) -> Path:
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=pbe
# cred_expire: also how long a requeued job waits before it restarts (default 120 s)
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def _start_munge(root: Path) -> None:
    munge = root / "munge"
    munge.mkdir(mode=0o755, exist_ok=True)
    os.chmod(munge, 0o755)  # munged refuses a socket folder others cannot traverse
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    subprocess.run(
        [
            "munged",
            f"--socket={munge}/munge.socket.2",
            f"--key-file={key}",
            f"--log-file={munge}/munged.log",
            f"--pid-file={munge}/munged.pid",
            f"--seed-file={munge}/munged.seed",
            "--force",
        ],
        check=True,
    )


@contextmanager
def slurm_cluster(root: Path):
    """Yields the environment (with SLURM_CONF) to run sbatch/squeue against the cluster."""
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    conf = _write_conf(root, host)
    env = dict(os.environ, SLURM_CONF=str(conf))
    _start_munge(root)
    try:
        subprocess.run(["slurmctld", "-c"], env=env, check=True)
        subprocess.run(["slurmd"], env=env, check=True)
        _wait_for_idle_node(env)
        yield env
    finally:
        _cancel_all_jobs(env)  # a failed test's job must not outlive its cluster
        for pid_file in [
            root / "run/slurmd.pid",
            root / "run/slurmctld.pid",
            root / "munge/munged.pid",
        ]:
            _stop(pid_file)


def _cancel_all_jobs(env: dict, timeout: float = 30) -> None:
    jobs = subprocess.run(
        ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True
    ).stdout.split()
    if not jobs:
        return
    subprocess.run(["scancel", "--signal=KILL", "--full", *jobs], env=env, capture_output=True)
    subprocess.run(["scancel", *jobs], env=env, capture_output=True)
    deadline = time.time() + timeout
    while (
        time.time() < deadline
        and subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip()
    ):
        time.sleep(0.5)


def _wait_for_idle_node(env: dict, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
        ).stdout
        if "idle" in state:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the loopback SLURM node never became idle (sinfo: {state!r})")


def _stop(pid_file: Path) -> None:
    with suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


def wait_for_job(job_id: str, env: dict, timeout: float) -> str:
    """Waits until the job leaves the queue; returns its final state from scontrol."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True
        ).stdout
        if not queued.strip():
            break
        time.sleep(1)
    else:
        raise TimeoutError(f"SLURM job {job_id} still queued/running after {timeout} s")
    info = subprocess.run(
        ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True
    ).stdout
    return next((w.split("=")[1] for w in info.split() if w.startswith("JobState=")), "UNKNOWN")


def job_field(job_id: str, env: dict, field: str) -> str:
    """One ``Key=Value`` field of ``scontrol show job`` (e.g. JobState, Restarts)."""
    info = subprocess.run(
        ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True
    ).stdout
    return next((w.split("=", 1)[1] for w in info.split() if w.startswith(f"{field}=")), "")
