"""``python -m pbe_lightning.sweeps.summary``: a real tiny sweep summarised, and hand-made
sweep folders for the statuses, the metric choice and the errors."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pbe_lightning.sweeps.job import Job
from pbe_lightning.sweeps.summary import main
from pbe_lightning.sweeps.table import direction
from pbe_lightning.sweeps.variants import name_variants
from tests.helpers.processes import run_train

VARIANTS = ["data/mask=box", "data/mask=irregular"]


def wandb_can_read_logs() -> bool:
    """wandb >= 0.31 reads a ``.wandb`` log (``wandb leet inspect``); older ones cannot."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--help"]
    return subprocess.run(command, capture_output=True, timeout=120).returncode == 0


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A real ``python train.py -m ablation=mask`` sweep, narrowed to two jobs of 4 steps
    (debug=tiny validates every 2 steps: 2 validation points), with W&B and CSV logs."""
    root = tmp_path_factory.mktemp("sweep")
    args = ["-m", "ablation=mask", "debug=tiny", "data/mask=box,irregular", "logger=wandb_csv"]
    result = run_train([*args, f"hydra.sweep.dir={root / 'sweep'}"], cwd=root, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    # What the sweep itself wrote when it ended, before the tests below summarise it again.
    (root / "console.txt").write_text(result.stdout + result.stderr)
    if (root / "sweep" / "summary.md").is_file():
        shutil.copy(root / "sweep" / "summary.md", root / "summary_at_the_end.md")
    return root / "sweep"


def read_csv_logs(job: Path) -> dict[str, list[tuple[int, float]]]:
    """A job's metrics.csv read independently of the summary: metric -> (steps done, value)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with (job / "csv" / "version_0" / "metrics.csv").open() as stream:
        for row in csv.DictReader(stream):
            for key, text in row.items():
                if text and (key.startswith("val/") or key == "train/loss"):
                    series.setdefault(key, []).append((int(row["step"]) + 1, float(text)))
    return series


def test_a_real_sweep_is_summarised_with_the_best_variant_from_its_csv_numbers(
    sweep, tmp_path, capsys
):
    logs = [read_csv_logs(sweep / str(n)) for n in (0, 1)]
    assert [len(s["val/loss"]) for s in logs] == [2, 2]  # validated at steps 2 and 4
    # The paper's FID when the validation logs it (with CLIP-score, higher is better), else
    # the loss; the best of a job is its lowest value over the validation points.
    metric = "val/fid_clip" if "val/fid_clip" in logs[0] else "val/loss"
    lowest = [min(v for _, v in s[metric]) for s in logs]
    winner = VARIANTS[lowest.index(min(lowest))]

    summary = main([str(sweep), "--out", str(tmp_path / "out")])

    printed = capsys.readouterr().out
    assert [j.variant for j in summary.jobs] == VARIANTS
    assert [j.status for j in summary.jobs] == ["finished", "finished"]
    assert [j.steps for j in summary.jobs] == [4, 4]
    assert summary.metric == metric and summary.mode == "min"
    assert summary.metrics[0] == metric and set(summary.metrics) == set(logs[0])
    assert [j.series for j in summary.jobs] == logs
    md = (tmp_path / "out" / "summary.md").read_text()
    first = md.splitlines()[0]
    assert first.startswith(f"best on {metric} (min): {winner} ({min(lowest):.4g} at step ")
    for variant in VARIANTS:
        assert f"| {variant} | finished | 4/4 |" in md
    assert f"**{min(lowest):.4g} @" in md  # the best value of the column, in bold
    assert "W&B: group `demo+ablation=mask/sweep`" in md
    assert md in printed and "summary.png" in printed.splitlines()[-1]

    with (tmp_path / "out" / "summary.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [r["variant"] for r in rows] == VARIANTS
    assert [float(r[f"{metric} best"]) for r in rows] == lowest
    for key in ("val/loss", "train/loss"):
        assert [float(r[f"{key} final"]) for r in rows] == [s[key][-1][1] for s in logs]
    with Image.open(tmp_path / "out" / "summary.png") as image:
        assert image.size[0] >= 1000 and image.size[1] >= 360  # two panels side by side

    # --mode turns the ranking round; without --out, the files go into the sweep folder
    flipped = main([str(sweep), "--metric", metric, "--mode", "max"])
    assert flipped.best.variant == VARIANTS[lowest.index(max(lowest))] != winner
    assert (sweep / "summary.md").read_text().startswith(f"best on {metric} (max): ")
    assert {p.name for p in flipped.files} == {"summary.md", "summary.csv", "summary.png"}


def test_a_sweep_summarises_itself_when_it_ends(sweep):
    at_the_end = (sweep.parent / "summary_at_the_end.md").read_text()
    assert at_the_end.startswith("best on val/fid_clip (min): data/mask=")
    assert "2 jobs, 2 finished" in at_the_end
    console = (sweep.parent / "console.txt").read_text()
    assert f"sweep summary: {at_the_end.splitlines()[0]}" in console
    assert f"python -m pbe_lightning.sweeps.summary {sweep}` updates it" in console


@pytest.mark.slow
def test_a_sweep_whose_job_failed_is_summarised_anyway(tmp_path, cache_dir):
    # Job 1 fails at its first step; Hydra then ends the sweep with that job's error.
    fail = ["+callbacks.fail._target_=tests.helpers.faults.FailAt", "+callbacks.fail.step=100,0"]
    args = ["-m", "debug=tiny", "trainer.max_steps=2", *fail, f"hydra.sweep.dir={tmp_path / 's'}"]
    result = run_train(args, cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 1 and "a test failure at step 0" in result.stderr
    assert "the sweep ended early: summarising what its jobs wrote" in result.stdout
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert "2 jobs, 1 finished, 1 failed" in summary
    assert "best on val/fid_clip (min): callbacks.fail.step=100" in summary


def test_a_summary_that_cannot_be_written_warns_with_the_command_to_run_by_hand(tmp_path, caplog):
    from pbe_lightning.sweeps.summary_callback import SummariseSweep, summarise_quietly

    assert not summarise_quietly(tmp_path / "gone")  # never raises: the sweep's result stands
    assert f"run `python -m pbe_lightning.sweeps.summary {tmp_path / 'gone'}` by hand" in (
        caplog.text
    )
    caplog.clear()
    callback = SummariseSweep()
    callback.sweep = tmp_path  # a sweep stopped before any job (a config check): no summary
    callback.after_a_failed_job()
    assert caplog.text == "" and not (tmp_path / "summary.md").exists()


@pytest.mark.skipif(not wandb_can_read_logs(), reason="this wandb cannot read .wandb logs")
def test_jobs_without_csv_logs_are_read_from_their_wandb_runs(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    for job in ("0", "1"):
        shutil.rmtree(copy / job / "csv")  # as logger=wandb leaves it

    summary = main([str(copy)])

    for job, original in zip(summary.jobs, ("0", "1")):
        assert job.source == "wandb" and job.status == "finished"
        assert job.series == read_csv_logs(sweep / original)  # the same numbers, the same steps
        assert "logger=wandb_csv" in job.note
    assert summary.best.variant == main([str(sweep)]).best.variant


# ---------------------------------------------------------------------------- hand-made sweeps

TARGETS = {
    "csv": "lightning.pytorch.loggers.CSVLogger",
    "wandb": "lightning.pytorch.loggers.WandbLogger",
}
DONE = "[INFO] - `Trainer.fit` stopped: `max_steps=4` reached.\n"


def fake_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    metrics: dict[str, list[float | None]] | None = None,
    loggers: tuple[str, ...] = ("csv",),
    log: str = "",
    version: int = 0,
) -> Path:
    """A job folder as train.py leaves it; ``metrics``: column -> value per logged row."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    cfg = {"trainer": {"max_steps": 4}, "logger": {k: {"_target_": TARGETS[k]} for k in loggers}}
    (job / "config_resolved.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        folder = job / "csv" / f"version_{version}"
        folder.mkdir(parents=True)
        with (folder / "metrics.csv").open("w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["epoch", *metrics])  # metrics["step"]: Lightning's, steps - 1
            for row in zip(*metrics.values()):
                writer.writerow([0, *("" if v is None else v for v in row)])
    if log:
        (job / "train.log").write_text(log)
    return job


def test_statuses_and_what_each_job_lacks_are_told(tmp_path):
    sweep = tmp_path / "sweep"
    rows = {"step": [1, 3], "val/loss": [0.5, 0.4]}
    fake_job(sweep, 0, ["seed=1"], rows, log=DONE)
    fake_job(sweep, 1, ["seed=2"], {"step": [1], "val/loss": [0.3]})  # written just now
    stale = fake_job(sweep, 2, ["seed=3"], {"step": [1], "val/loss": [0.6]})
    an_hour_ago = time.time() - 3600
    os.utime(stale / "csv" / "version_0" / "metrics.csv", (an_hour_ago, an_hour_ago))
    fake_job(sweep, 3, ["seed=4"])  # the CSV logger was on and wrote nothing
    fake_job(sweep, 4, ["seed=5"], loggers=("wandb",), log=DONE)  # W&B only, no W&B run left
    signalled = {"step": [1], "val/loss": [0.45]}
    fake_job(sweep, 5, ["seed=6"], signalled, log="[INFO] - finished in /x: {}\n")

    summary = main([str(sweep), "--out", str(tmp_path / "out")])

    jobs = {j.name: j for j in summary.jobs}
    assert {n: j.status for n, j in jobs.items()} == {
        "0": "finished",
        "1": "running",
        "2": "stopped",
        "3": "failed",
        "4": "finished",
        "5": "stopped",
    }
    assert "at step 2 of 4" in jobs["1"].note
    assert "killed or crashed" in jobs["2"].note and "2/train.log" in jobs["2"].note
    assert jobs["3"].note.startswith("failed: no metrics")
    assert "no CSV logs" in jobs["4"].note and "logger=wandb_csv" in jobs["4"].note
    assert "shutdown signal" in jobs["5"].note
    md = summary.markdown
    assert md.startswith("best on val/loss (min): seed=2 (0.3 at step 2, running)\n")
    assert "6 jobs, 2 finished, 1 running, 2 stopped, 1 failed." in md
    assert "| seed=4 | failed |  |" in md
    assert "- 4 (seed=5): no CSV logs" in md


def test_the_paper_metrics_are_the_default_with_their_own_directions(tmp_path):
    sweep = tmp_path / "sweep"
    columns = ("step", "val/loss", "val/fid_clip", "val/clip_score", "val/qs")
    fake_job(sweep, 0, ["data/mask=box"], dict(zip(columns, ([2, 4], [1, 1], [30, 20], [70, 80], [50, 60]))))  # fmt: skip
    fake_job(sweep, 1, ["data/mask=irregular"], dict(zip(columns, ([2, 4], [2, 2], [25, 22], [75, 76], [55, 52]))))  # fmt: skip

    default = main([str(sweep)])
    assert default.metric == "val/fid_clip" and default.mode == "min"
    assert default.headline == "best on val/fid_clip (min): data/mask=box (20 at step 5)"
    assert default.metrics == ["val/fid_clip", "val/clip_score", "val/loss", "val/qs"]
    assert "| variant | status | steps | val/fid_clip final | val/fid_clip best (min) |" in (
        default.markdown
    )
    assert "val/clip_score best (max)" in default.markdown
    assert main([str(sweep), "--metric", "val/clip_score"]).best.variant == "data/mask=box"
    assert main([str(sweep), "--metric", "val/qs"]).headline == (
        "best on val/qs (max): data/mask=box (60 at step 5)"
    )
    qs_min = main([str(sweep), "--metric", "val/qs", "--mode", "min"])
    assert qs_min.headline == "best on val/qs (min): data/mask=box (50 at step 3)"
    assert [direction(m) for m in ("val/loss", "val/fid_clip", "val/clip_score", "val/qs")] == [
        "min",
        "min",
        "max",
        "max",
    ]
    # The demo's task scores: following up, copy-paste leakage down.
    task = ("val/exemplar_following", "eval/shape_following", "val/leakage")
    assert [direction(m) for m in task] == ["max", "max", "min"]


def test_a_resumed_jobs_csv_versions_are_merged_the_later_winning(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["seed=1"], {"step": [0, 1, 2], "train/loss": [3.0, 2.0, 1.0]})
    fake_job(sweep, 0, ["seed=1"], {"step": [2, 3], "train/loss": [0.9, 0.8]}, version=1)
    fake_job(sweep, 1, ["seed=2"], {"step": [3], "train/loss": [0.7]}, log=DONE)

    summary = main([str(sweep)])

    assert summary.jobs[0].series == {"train/loss": [(1, 3.0), (2, 2.0), (3, 0.9), (4, 0.8)]}
    assert summary.metric == "train/loss"  # no val/* logged: the training loss is ranked


def test_variants_are_the_overrides_that_differ():
    jobs = [
        Job(str(n), Path(str(n)), overrides)
        for n, overrides in enumerate(
            [
                ["data/mask=box", "seed=1", "debug=tiny"],
                ["data/mask=box", "seed=2", "debug=tiny"],
                ["data/mask=irregular", "+seed=1", "debug=tiny"],
            ]
        )
    ]
    name_variants(jobs)
    assert [j.variant for j in jobs] == [
        "data/mask=box seed=1",
        "data/mask=box seed=2",
        "data/mask=irregular seed=1",
    ]
    alone = [Job("0", Path("0"), ["ablation=mask", "data/mask=box"])]
    name_variants(alone)
    assert alone[0].variant == "ablation=mask data/mask=box"


def make_sweeps_parent(tmp_path: Path) -> Path:
    fake_job(tmp_path / "multirun" / "train" / "2026-01-01_00-00-00", 0, ["seed=1"])
    return tmp_path / "multirun" / "train"


def make_single_run(tmp_path: Path) -> Path:
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text("[]\n")
    return tmp_path / "run"


def make_jobless_sweep(tmp_path: Path) -> Path:
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra: {}\n")
    return tmp_path / "sweep"


def make_sweep_without_csv(tmp_path: Path) -> Path:
    for num in (0, 1):
        fake_job(tmp_path / "sweep", num, [f"seed={num}"], loggers=("wandb",))
    return tmp_path / "sweep"


def make_sweep_with_loss(tmp_path: Path) -> Path:
    fake_job(tmp_path / "sweep", 0, ["seed=1"], {"step": [1], "val/loss": [1], "train/loss": [2]})
    return tmp_path / "sweep"


@pytest.mark.parametrize(
    ("make", "args", "expected"),
    [
        (lambda t: t / "nowhere", [], ["does not exist", "multirun/train/<stamp>"]),
        (lambda t: t, [], ["not a Hydra multirun folder", "multirun/train/<stamp>"]),
        (make_single_run, [], ["a single run's folder, not a sweep", "-m"]),
        (make_sweeps_parent, [], ["holds 1 sweep(s), not jobs", "e.g. ", "2026-01-01_00-00-00"]),
        (make_jobless_sweep, [], ["a sweep with no jobs yet", "wait for its first job"]),
        (
            make_sweep_without_csv,
            [],
            ["none of the 2 jobs has CSV logs", "logger=wandb_csv", "W&B's group view"],
        ),
        (
            make_sweep_with_loss,
            ["--metric", "val/fid"],
            ["unknown metric val/fid: the jobs log train/loss, val/loss", "--metric"],
        ),
    ],
    ids=["missing", "not-multirun", "single-run", "sweeps-parent", "no-jobs", "no-csv", "metric"],
)
def test_errors_are_one_line_with_the_cause_and_the_fix(tmp_path, make, args, expected):
    with pytest.raises(SystemExit) as error:
        main([str(make(tmp_path)), *args])
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message
    for part in expected:
        assert part in message
    assert not list(tmp_path.rglob("summary.md"))  # nothing written on an error
