"""A training step makes no host read and no collective between logging steps."""

from __future__ import annotations

import json

import pytest

from pbe_lightning.train import train
from tests.helpers.config import TINY
from tests.helpers.processes import run_train

QUIET = [
    "trainer.max_steps=13",
    "trainer.log_every_n_steps=4",
    "data.batches_per_epoch=50",  # no validation inside the counted steps
    "data.num_workers=1",  # the loader's own work runs in its worker, as in real runs
    "callbacks.checkpoint.every_n_train_steps=1000",
    "callbacks=ema",
]


def steps_between_logging(report: list[dict]) -> list[dict]:
    # The last step's window closes at the end of training (teardown reads are allowed).
    return [s for s in report[:-1] if not s["logging"]]


def test_a_single_process_step_reads_nothing_back_between_logging_steps(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        *QUIET,
        "+callbacks.syncs._target_=tests.helpers.callbacks.SyncCounter",
        f"+callbacks.syncs.dirpath={tmp_path}/syncs",
    )
    train(cfg)
    report = json.loads((tmp_path / "syncs" / "syncs_rank0.json").read_text())
    quiet = steps_between_logging(report)
    assert len(quiet) >= 8
    assert [s for s in quiet if s["calls"]] == []
    # The counter does see reads: the logging steps make them.
    assert any(s["calls"] for s in report if s["logging"])


@pytest.mark.slow
def test_two_ddp_ranks_make_no_collective_on_the_training_group_between_logging_steps(
    tmp_path, cache_dir
):
    run_dir = tmp_path / "ddp"
    args = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        *TINY,
        *QUIET,
        "+callbacks.syncs._target_=tests.helpers.callbacks.SyncCounter",
        f"+callbacks.syncs.dirpath={run_dir}/syncs",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_train(args, cwd=tmp_path, cache=cache_dir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((run_dir / "syncs" / f"syncs_rank{rank}.json").read_text())
        assert [s for s in steps_between_logging(report) if s["calls"]] == []
        # DDP's gradient all-reduce runs inside backward, in C++: not a host-side collective.
