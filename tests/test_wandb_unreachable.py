"""W&B online with no server to reach: the run waits ``logger.wandb.init_timeout_s``, then
trains and logs offline into the same run id, with one warning. The server is a closed port on
this machine (connection refused), the key a well-formed dummy. The run is launched once from a
plain process and once from one that runs W&B itself (a launcher, a sweep agent, pytest after
an in-process W&B test): its child inherits WANDB_SERVICE, a service the child cannot stop and
that keeps holding the failed online attempt's run id."""

from __future__ import annotations

import os

import pytest

from tests.helpers.config import TINY
from tests.helpers.processes import free_port, run_train


@pytest.fixture(params=["own service", "inherited service"])
def launcher_service(request, tmp_path_factory):
    """Nothing, or a live W&B service of this process exported in WANDB_SERVICE."""
    if request.param == "own service":
        yield None
        return
    import wandb

    run = wandb.init(mode="offline", dir=tmp_path_factory.mktemp("launcher"), project="launcher")
    run.finish()
    yield os.environ["WANDB_SERVICE"]
    wandb.teardown()  # stops it and takes WANDB_SERVICE out of the environment


@pytest.mark.slow
def test_wandb_online_without_a_reachable_server_trains_offline_after_its_timeout(
    tmp_path, cache_dir, launcher_service
):
    run_dir = tmp_path / "run"
    unreachable = {
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567",  # 40 characters, like a real key
    }
    args = [
        *TINY,
        "trainer.max_steps=2",
        "logger=wandb",
        "logger.wandb.offline=false",
        "logger.wandb.init_timeout_s=5",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_train(args, tmp_path, cache_dir, **unreachable)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("did not answer within 5 s") == 1  # one warning, naming the wait
    assert "logging this run offline" in output and "wandb sync" in output
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (attempt,) = (run_dir / "wandb").glob(f"run-*-{run_id}")  # the online try, W&B's log
    assert "with 5.0 second timeout" in (attempt / "logs" / "debug.log").read_text()
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")  # the same run, offline
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0
