"""``python -m pbe_lightning.sweeps.eval_sweep``: every checkpoint of a sweep evaluated as
evaluate.py evaluates it, in one table per variant and step beside training's numbers; reruns
reuse what is finished; W&B gets the table in the sweep's group."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pbe_lightning.demo.tiny_models import tiny_clip_folder
from pbe_lightning.sweeps.eval_sweep import main
from tests.helpers.benchmarks import real_images, released_benchmark
from tests.helpers.processes import finish, start_train
from tests.test_wandb_artifacts import of_type, wandb_records

VARIANTS = ("data/mask=box", "data/mask=irregular")
VAL_LOSS = {("0", 1): 0.5, ("1", 1): 0.4, ("1", 2): 0.3}  # (job, steps done): val/loss


def job_folder(sweep: Path, number: int, trained: Path) -> Path:
    """A job as ``train.py -m`` leaves it: its overrides, resolved config, checkpoints
    (step_*.ckpt and last.ckpt repeating the newest) and CSV logs."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([VARIANTS[number]]))
    config = yaml.safe_load((trained / "config_resolved.yaml").read_text())
    config["logger"] = {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger"}}
    (job / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    (job / "checkpoints").mkdir()
    shutil.copy(trained / "checkpoints" / "step_0000001.ckpt", job / "checkpoints")
    newest = job / "checkpoints" / "step_0000001.ckpt"
    if number == 1:  # a second step: the same weights, saved as step 2
        checkpoint = torch.load(newest, weights_only=True)
        checkpoint["global_step"] = 2
        newest = job / "checkpoints" / "step_0000002.ckpt"
        torch.save(checkpoint, newest)
    shutil.copy(newest, job / "checkpoints" / "last.ckpt")
    (job / "csv" / "version_0").mkdir(parents=True)
    with (job / "csv" / "version_0" / "metrics.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["step", "val/loss"])
        for (name, done), value in VAL_LOSS.items():
            if name == str(number):
                writer.writerow([done - 1, value])
    (job / "train.log").write_text("`Trainer.fit` stopped: `max_steps=2` reached.\n")
    return job


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir, tiny_checkpoint) -> dict:
    root = tmp_path_factory.mktemp("sweep-eval")
    sweep = root / "multirun" / "train" / "stamp"
    sweep.mkdir(parents=True)
    choices = {"experiment": "demo", "ablation": "mask"}
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    trained = tiny_checkpoint.parent.parent
    for number in (0, 1):
        job_folder(sweep, number, trained)
    args = [
        f"benchmark={released_benchmark(root / 'bench', 4)}",
        f"real_images={real_images(root / 'real')}",
        f"clip.arch=local-dir:{tiny_clip_folder(cache_dir)}",
        "steps=2",
        "batch_size=2",
        "logger=wandb",
        "logger.wandb.offline=true",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes below: the same sums, the same pixels
    try:
        rows = main([str(sweep), *args])
    finally:
        torch.set_num_threads(threads)
    return {"sweep": sweep, "args": args, "rows": rows, "cache": cache_dir}


def test_every_step_of_every_variant_is_a_row_beside_trainings_numbers(sweep):
    rows, folder = sweep["rows"], sweep["sweep"] / "eval"
    # One evaluation per step: last.ckpt repeats the newest step_*.ckpt.
    assert [(r["variant"], r["step"]) for r in rows] == [
        (VARIANTS[0], 1),
        (VARIANTS[1], 1),
        (VARIANTS[1], 2),
    ]
    assert [Path(r["checkpoint"]).name for r in rows] == ["step_0000001.ckpt"] * 2 + [
        "step_0000002.ckpt"
    ]
    for row in rows:
        report = json.loads(
            (folder / row["job"] / f"step-{row['step']}" / "metrics.json").read_text()
        )
        assert report["config"]["ckpt_path"] == row["checkpoint"]
        assert report["counts"]["items"] == report["counts"]["painted_this_run"] == 4
        assert {k: row[f"eval/{k}"] for k in report["metrics"]} == report["metrics"]
        assert row["val/loss at step"] == VAL_LOSS[(row["job"], row["step"])]
        assert row["status"] == "finished"
    # The same weights at every step (copies): the same edits, so the same numbers.
    assert len({r["eval/fid_clip"] for r in rows}) == 1
    # The summary's row of each job is joined in: final and best val/loss.
    assert [r["val/loss best"] for r in rows] == [0.5, 0.3, 0.3]

    table = (folder / "eval_table.md").read_text().splitlines()
    assert (
        table[0]
        == f"best on eval/fid_clip (min): {VARIANTS[0]} at step 1 ({rows[0]['eval/fid_clip']:.4g})"
    )
    assert sum(line.startswith("| data/mask=") for line in table) == 3
    with (folder / "eval_table.csv").open() as stream:
        assert [r["step"] for r in csv.DictReader(stream)] == ["1", "1", "2"]


def test_the_table_is_logged_to_the_sweeps_wandb_group_with_each_evaluation(sweep):
    folder = sweep["sweep"] / "eval"
    (table_run,) = (folder / "wandb").glob("offline-run-*")
    (run,) = of_type(wandb_records(table_run), "run")
    assert (run.run_group, run.job_type) == ("demo+ablation=mask/stamp", "eval")
    (table,) = (table_run / "files" / "media" / "table" / "eval").glob("sweep_table*.json")
    assert len(json.loads(table.read_text())["data"]) == 3
    for job, step in (("0", 1), ("1", 2)):
        (eval_run,) = (folder / job / f"step-{step}" / "wandb").glob("offline-run-*")
        (run,) = of_type(wandb_records(eval_run), "run")
        assert (run.run_group, run.job_type) == ("demo+ablation=mask/stamp", "eval")
        assert run.display_name.endswith(f"@step-{step}")


def test_a_rerun_reuses_finished_evaluations_and_new_settings_evaluate_again(sweep, caplog):
    folder = sweep["sweep"] / "eval"
    reports = sorted(folder.glob("*/step-*/metrics.json"))
    before = {p: p.stat().st_mtime_ns for p in reports}
    caplog.set_level("INFO")
    again = main([str(sweep["sweep"]), *sweep["args"][:-2]])  # without W&B this time
    assert again == [{k: v for k, v in r.items()} for r in sweep["rows"]]
    assert {p: p.stat().st_mtime_ns for p in reports} == before
    assert caplog.text.count("evaluated already") == 3

    out = sweep["sweep"].parent / "other"
    fp32 = main([str(sweep["sweep"]), *sweep["args"][:-2], "precision=fp32", "--out", str(out)])
    assert [r["step"] for r in fp32] == [1, 1, 2]
    assert (out / "1" / "step-2" / "edits" / "settings.json").is_file()


def test_mistakes_are_one_line_each_before_anything_is_painted(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit, match="error: .*steps=0 must be a whole number >= 1"):
        main([str(sweep["sweep"]), *sweep["args"], "steps=0", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit, match="error: ckpt_path comes from the sweep"):
        main([str(sweep["sweep"]), "ckpt_path=x.ckpt"])
    with pytest.raises(SystemExit, match="no checkpoint matches checkpoints/none_\\*.ckpt"):
        main([str(sweep["sweep"]), *sweep["args"], "--checkpoints", "none_*.ckpt"])
    with pytest.raises(SystemExit, match="is not a Hydra multirun folder"):
        main([str(tmp_path), *sweep["args"]])
    with pytest.raises(SystemExit, match="error: .*nosuchkey.*fix the key=value arguments"):
        main([str(sweep["sweep"]), "nosuchkey=1"])


@pytest.mark.slow
def test_under_torchrun_every_checkpoint_is_split_over_the_processes(sweep):
    out = sweep["sweep"].parent / "torchrun"
    launcher = ["--standalone", "--nproc-per-node=2", "-m", "pbe_lightning.sweeps.eval_sweep"]
    args = [*launcher, str(sweep["sweep"]), *sweep["args"][:-2], "--out", str(out)]
    process = start_train(args, out.parent, sweep["cache"], "torch.distributed.run")
    result = finish(process, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("process 1 of 2 (torchrun)") == 1  # one group
    with (out / "eval_table.csv").open() as stream:
        split = list(csv.DictReader(stream))
    metrics = [c for c in split[0] if c.startswith("eval/")]
    for row, alone in zip(split, sweep["rows"], strict=True):
        assert {c: row[c] for c in metrics} == {
            c: str(alone[c] if alone[c] is not None else "") for c in metrics
        }
    for folder in (sweep["sweep"] / "eval").glob("*/step-*"):
        mine = out / folder.parent.name / folder.name
        for edit in (folder / "edits").glob("*.png"):
            assert (mine / "edits" / edit.name).read_bytes() == edit.read_bytes()
