"""A sweep checks every job's config where ``-m`` runs, before any job starts.

(The same under SLURM, where nothing is queued: tests/test_slurm.py.)
"""

from __future__ import annotations

from tests.helpers.config import TINY
from tests.helpers.processes import run_train


def test_bad_values_stop_the_sweep_before_any_job_naming_the_keys_and_the_jobs(tmp_path, cache_dir):
    # 4 jobs: the cfg ablation's grid, its rates narrowed to 0.0 and a bad 1.5, times its 2
    # modes. The learning rate is wrong in every job, the rate in half of them.
    args = ["-m", "ablation=cfg", "model.cfg_dropout=0.0,1.5", "model.optimizer.lr=-1", *TINY]
    result = run_train(args, tmp_path, cache_dir, timeout=240)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == (
        "error: model.optimizer.lr=-1 must be a positive number: e.g. model.optimizer.lr=1e-5 "
        "(the paper's) (all 4 jobs)"
    )
    # The jobs named by what sets them apart.
    assert errors[1].startswith("error: model.cfg_dropout=1.5 must be a probability in [0, 1]")
    assert errors[1].endswith(
        "(2 of 4 jobs: #2 (model.cfg_dropout=1.5,model.cfg_dropout_mode=per_sample), "
        "#3 (model.cfg_dropout=1.5,model.cfg_dropout_mode=per_batch))"
    )
    assert errors[2].startswith("error: no job was started or queued (BasicLauncher)")
    assert len(errors) == 3 and "Traceback" not in result.stderr
    assert not (tmp_path / "multirun").exists()  # no sweep folder, no job folder


def test_a_swept_option_that_does_not_exist_stops_the_sweep_before_any_job(tmp_path, cache_dir):
    result = run_train(["-m", "data/mask=box,boxes", *TINY], tmp_path, cache_dir, timeout=240)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: the config cannot be composed: ")
    assert "Could not find 'data/mask/boxes'" in errors[0]
    assert errors[0].endswith("(1 of 2 jobs: #1 (data/mask=boxes))")
    assert errors[1].startswith("error: no job was started or queued (BasicLauncher)")
    assert not (tmp_path / "multirun").exists()
