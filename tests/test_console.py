"""``python train.py`` prints our progress bar, our log lines and real problems, nothing else."""

from __future__ import annotations

import os
import re

import pytest

from tests.helpers.processes import run_train

SHORT_DEMO = [
    "trainer.max_steps=20",
    "trainer.log_every_n_steps=10",
    "data.batches_per_epoch=10",
]

# What the demo printed before, each from a source silenced in pbe_lightning/train.py,
# callbacks/ (progress_bar, model_summary) or models/encoder.py.
NOISE = {
    "open_clip's INFO lines on the root logger": r"\[root\]\[INFO\]|Parsing model identifier",
    "Lightning's own console handler (every line twice)": r"^INFO: ",
    "the litlogger advert": r"litlogger",
    "the TPU line": r"TPU available",
    "the seed line": r"Seed set to",
    "W&B's anonymous-setting warning": r"anonymous setting",
    "W&B's version banner and end-of-run tables": r"Tracking run with wandb|Run history|Run summary",
    "Lightning's torch pytree deprecation": r"LeafSpec",
    "the model summary's FLOPs column of zeros": r"FLOPs|Total Flops",
    "the progress bar's epoch over max_epochs - 1": r"Epoch \d+/-",
    "the logger version in the bar": r"v_num=",
    "the max_steps stop line (it ran into the bar)": r"`Trainer.fit` stopped",
}
IN_SLURM_JOB = "SLURM_JOB_ID" in os.environ
if not IN_SLURM_JOB:
    NOISE["the srun hint outside a SLURM job"] = r"`srun` command is available"

# A Python warning line: "...Warning: message" (the default format) or "path.py:123: message"
# (Lightning's format for warnings raised from a path containing "lightning": Lightning's own
# and this package's, whose category it leaves out).
WARNING_LINE = re.compile(r"\w+Warning: |^\S+\.py:\d+: ", re.MULTILINE)

# Warning lines the short demo may print (a substring each), with the reason: none outside a
# SLURM job. Inside one (the tests run under sbatch), a run without srun may really be a
# mistake, so Lightning's hint is kept there.
ALLOWED_WARNINGS = {"`srun` command is available": "inside a SLURM job"} if IN_SLURM_JOB else {}


def console_lines(text: str) -> list[str]:
    """The lines a terminal would end up showing: progress bars redraw with carriage
    returns, so only the last state of each line remains."""
    return [line.split("\r")[-1] for line in text.splitlines()]


@pytest.mark.slow
def test_the_short_demo_prints_only_our_bar_our_lines_and_real_problems(tmp_path, cache_dir):
    run_dir = tmp_path / "demo"
    result = run_train(
        [*SHORT_DEMO, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        cache=cache_dir,
        timeout=900,  # a fresh test cache: the demo's VAE and CLIP are pretrained first
        WANDB_SILENT="false",  # the tests' default; a user sees W&B's lines
        WANDB_MODE="offline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    found = {what: re.findall(pattern, output, re.MULTILINE) for what, pattern in NOISE.items()}
    found = {what: hits for what, hits in found.items() if hits}
    assert not found, f"noise on the console: {found}\n{output[-4000:]}"

    warning_lines = [
        line
        for line in console_lines(output)
        if WARNING_LINE.search(line) and not any(p in line for p in ALLOWED_WARNINGS)
    ]
    assert warning_lines == [], "\n".join(warning_lines)

    # What stays: where W&B wrote the run, and the bar's true counts at the end.
    assert f"Run data is saved locally in {run_dir}/wandb/offline-run-" in output
    assert "Epoch 1: 100%" in output and "10/10" in output and "step=20/20" in output
    totals = re.findall(r"\| (\d+)/(\d+) \[", output)
    assert totals and all(int(n) <= int(total) for n, total in totals), totals
    # train/lr comes from Lightning's LearningRateMonitor, one column per parameter group.
    header = next((run_dir / "csv").glob("*/metrics.csv")).read_text().splitlines()[0]
    assert {"train/lr/unet", "train/lr/mapper"} <= set(header.split(","))
