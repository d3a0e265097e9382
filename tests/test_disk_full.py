"""A disk that fills up while training writes a checkpoint: a real tmpfs, filled by another
process between two checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tests.helpers.config import TINY
from tests.helpers.faults import hold_at, let_go, wait_until_held
from tests.helpers.mounts import fill, small_filesystem
from tests.helpers.processes import finish, run_train, start_train


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_write_stops_in_one_line_and_keeps_last_ckpt(
    tmp_path, cache_dir
):
    run_dir, hold = tmp_path / "run", tmp_path / "hold"  # the hold's files: off the full disk
    last = run_dir / "checkpoints" / "last.ckpt"
    args = [
        *TINY,
        "trainer.max_steps=6",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.checkpoint.save_top_k=0",  # last.ckpt alone: the file under test
        f"hydra.run.dir={run_dir}",
    ]
    with small_filesystem(run_dir, megabytes=64):  # the whole run folder on it
        process = start_train([*args, *hold_at(3, hold)], tmp_path, cache_dir)
        wait_until_held(process, hold)  # step 2's last.ckpt is written, step 4's is to come
        before = digest(last)
        filler = fill(run_dir, leave_bytes=256 << 10)  # room for logs, not for a checkpoint
        let_go(hold)
        result = finish(process, timeout=120)

        assert result.returncode == 1
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr
        assert errors[0].startswith(f"error: no space left on {run_dir} (disk or quota) for {last}")
        assert "the previous last.ckpt is kept" in errors[0] and "ckpt_path=last" in errors[0]
        assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no temp file left
        assert digest(last) == before

        filler.unlink()  # the user frees space and resumes, as the line says
        result = run_train([*args, "ckpt_path=last"], tmp_path, cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming from" in result.stdout + result.stderr
        resumed = torch.load(last, map_location="cpu", weights_only=True)
        assert resumed["global_step"] == 6
