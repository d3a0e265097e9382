"""evaluate.py split over processes and jobs (``eval_shards``): torchrun on CPUs (gloo) paints
the edits one process paints and scores them once; a run killed with ``kill -9`` resumes; the
jobs of an array paint their shards and ``score_only=true`` scores them all; precision and
speed switches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from pbe_lightning.demo.tiny_models import tiny_clip_folder
from pbe_lightning.eval_shards import Part, Processes
from pbe_lightning.evaluate import evaluate
from pbe_lightning.images import read_image
from pbe_lightning.utils.eval_checks import eval_config_problems
from tests.helpers.benchmarks import real_images, released_benchmark
from tests.helpers.config import CONF, REPO
from tests.helpers.processes import finish, start_train
from tests.helpers.slurm_cluster import missing_binaries, slurm_cluster, wait_for_job

ITEMS = 8  # chunks of 2: [0, 2) [2, 4) [4, 6) [6, 8)
BATCH = 2
TORCHRUN = "torch.distributed.run"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir, tiny_checkpoint) -> dict:
    root = tmp_path_factory.mktemp("sharded")
    args = [
        f"ckpt_path={tiny_checkpoint}",
        f"benchmark={released_benchmark(root / 'bench', ITEMS)}",
        f"real_images={real_images(root / 'real')}",
        f"clip.arch=local-dir:{tiny_clip_folder(cache_dir)}",
        f"batch_size={BATCH}",
    ]
    return {"root": root, "args": args, "cache": cache_dir}


def eval_config(out: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def edits(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "edits").glob("*.png"))}


def report(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def start_evaluate(setup: dict, out: Path, processes: int = 1, *extra: str):
    """``python evaluate.py`` or ``torchrun --nproc-per-node=N evaluate.py``, one thread per
    process (CPU kernels sum in another order with other thread counts), in its own group.
    8 sampling steps: the painting lasts long enough to be killed in the middle."""
    args = [*setup["args"], "steps=8", f"hydra.run.dir={out}", *extra]
    if processes == 1:
        return start_train(args, out.parent, setup["cache"], "evaluate", OMP_NUM_THREADS="1")
    launcher = ["--standalone", f"--nproc-per-node={processes}", str(REPO / "evaluate.py")]
    return start_train(
        [*launcher, *args], out.parent, setup["cache"], TORCHRUN, OMP_NUM_THREADS="1"
    )


@pytest.fixture
def one_thread():
    """In-process runs compared bit for bit: one thread, as the subprocesses use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(setup) -> Path:
    """The reference: one process paints and scores everything."""
    out = setup["root"] / "single"
    result = finish(start_evaluate(setup, out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# --- the deal ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shards, world", [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 4)])
def test_every_chunk_is_painted_by_exactly_one_process(shards, world):
    chunks = [[k] for k in range(11)]
    dealt = [
        chunk
        for shard in range(shards)
        for rank in range(world)
        for chunk in Part(shard, shards, Processes(rank, world)).chunks(chunks)
    ]
    assert sorted(dealt) == chunks
    scorers = [
        (s, r)
        for s in range(shards)
        for r in range(world)
        if Part(s, shards, Processes(r, world)).scores
    ]
    assert scorers == ([(0, 0)] if shards == 1 else [])  # arrays: score_only scores


# --- torchrun ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_paint_the_edits_of_one_and_score_them_once(setup, single):
    out = setup["root"] / "torchrun"
    result = finish(start_evaluate(setup, out, 2), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "process 1 of 2 (torchrun)" in output
    assert output.count(f"-> {out / 'metrics.json'}") == 1  # scored once, by rank 0
    assert edits(out) == edits(single) and len(edits(out)) == ITEMS  # bit for bit
    two, one = report(out), report(single)
    assert two["metrics"] == one["metrics"]  # over all edits, not averaged per process
    assert (
        two["counts"]
        == one["counts"]
        == {"items": ITEMS, "painted_this_run": ITEMS, "real_images": 8}
    )


def rank_process(launcher, rank: int) -> psutil.Process:
    """The worker torchrun started for ``rank`` (in a session of its own)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children():
            if child.environ().get("RANK") == str(rank):
                return child
        time.sleep(0.05)
    raise AssertionError(f"torchrun has no rank {rank}")


@pytest.mark.slow
def test_a_process_killed_mid_painting_and_the_run_started_again_resumes(setup, single):
    out = setup["root"] / "killed"
    launcher = start_evaluate(setup, out, 2)
    victim = rank_process(launcher, 1)
    deadline = time.time() + 240
    while len(list((out / "edits").glob("*.png"))) < 2 and time.time() < deadline:
        assert launcher.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(os.getpgid(victim.pid), signal.SIGKILL)  # rank 1's group: the OOM killer, say
    stopped = finish(launcher)
    assert stopped.returncode != 0  # torchrun stopped rank 0 and failed the run
    done = len(list((out / "edits").glob("*.png")))
    assert 2 <= done < ITEMS, f"{done} edits when the run stopped"
    assert not (out / "metrics.json").exists()

    result = finish(start_evaluate(setup, out, 2), timeout=300)  # the same command again
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = report(out)
    assert resumed["counts"]["painted_this_run"] == ITEMS - done  # finished edits skipped
    assert edits(out) == edits(single)
    assert resumed["metrics"] == report(single)["metrics"]


# --- an array: shards, then score_only --------------------------------------------------------
def test_an_arrays_shards_paint_their_part_and_score_only_scores_them_all(
    setup, tmp_path, one_thread
):
    reference = evaluate(eval_config(tmp_path / "one", *setup["args"], "steps=2"))
    out = tmp_path / "array"
    first = evaluate(eval_config(out, *setup["args"], "steps=2", "shard=0", "shards=2"))
    assert first == {"shard": 0, "shards": 2, "painted_this_run": ITEMS // 2}
    ids = sorted(edits(tmp_path / "one"))
    assert sorted(edits(out)) == ids[0:2] + ids[4:6]  # chunks 0 and 2
    assert not (out / "metrics.json").exists()  # a shard never scores
    with pytest.raises(FileNotFoundError, match=r"4 of 8 edits are not in .*paint them first"):
        evaluate(eval_config(out, *setup["args"], "steps=2", "score_only=true"))

    second = evaluate(eval_config(out, *setup["args"], "steps=2", "shard=1", "shards=2"))
    assert second["painted_this_run"] == ITEMS // 2
    scored = evaluate(eval_config(out, *setup["args"], "steps=2", "score_only=true"))
    assert edits(out) == edits(tmp_path / "one")
    assert scored["metrics"] == reference["metrics"]
    assert scored["counts"]["painted_this_run"] == 0
    with pytest.raises(ValueError, match="other settings"):  # scored as they were painted
        evaluate(eval_config(out, *setup["args"], "score_only=true", "steps=3"))
    with pytest.raises(FileNotFoundError, match="no edits to score"):
        evaluate(eval_config(tmp_path / "empty", *setup["args"], "steps=2", "score_only=true"))


def test_split_and_precision_mistakes_are_listed_up_front(setup, tmp_path):
    cfg = eval_config(
        tmp_path,
        *setup["args"],
        "precision=fp8",
        "shard=2",
        "shards=2",
        "compile=yes",
        "wait_min=0",
    )
    problems = "\n".join(eval_config_problems(cfg))
    assert "precision=fp8 must be one of fp16, bf16, fp32" in problems
    assert "shard=2 must be a whole number from 0 to shards-1 (1)" in problems
    assert "compile=yes must be true or false" in problems
    assert "wait_min=0 must be minutes > 0" in problems


@pytest.mark.slow
def test_an_arrays_jobs_must_name_their_shared_folder(setup, tmp_path):
    """The jobs of an array meet in a folder the command line names: Hydra's default one is
    named after each job's own id."""
    args = [*setup["args"], "shards=2", "shard=1"]
    result = finish(start_train(args, tmp_path, setup["cache"], "evaluate"), timeout=120)
    assert result.returncode == 1
    assert "error: shards=2: the jobs and the scoring step must use one folder" in result.stderr


# --- precision and speed ----------------------------------------------------------------------
def test_precision_is_a_switch_of_the_painting_and_channels_last_keeps_the_picture(
    setup, tmp_path, one_thread
):
    runs = {}
    for name, extra in {
        "fp16": [],
        "bf16": ["precision=bf16"],
        "fp32": ["precision=fp32"],
        "fp32_channels_last": ["precision=fp32", "channels_last=true"],
    }.items():
        out = tmp_path / name
        evaluate(
            eval_config(out, *setup["args"], "steps=2", *extra, "limit=2", "metrics=[clip_score]")
        )
        runs[name] = edits(out)
        settings = json.loads((out / "edits" / "settings.json").read_text())
        assert settings["precision"] == (extra[0].split("=")[1] if extra else "fp16")
    assert runs["fp16"] != runs["fp32"] and runs["bf16"] != runs["fp32"]  # the same seeds
    for name in runs["fp32"]:
        plain = read_image(tmp_path / "fp32" / "edits" / name)
        fast = read_image(tmp_path / "fp32_channels_last" / "edits" / name)
        assert (plain - fast).abs().max() <= 2 / 255  # another memory layout, the same picture


def test_the_paper_precision_is_the_default(tmp_path):
    cfg = eval_config(tmp_path, "ckpt_path=x.ckpt", "benchmark=COCOEE", "real_images=test_set_GT")
    assert (cfg.precision, cfg.channels_last, cfg.compile) == ("fp16", False, False)
    assert (cfg.shard, cfg.shards, cfg.score_only) == (0, 1, False)


@pytest.mark.slow
def test_a_compiled_unet_paints_the_same_picture(setup, tmp_path, one_thread):
    common = [*setup["args"], "steps=2", "precision=fp32", "limit=2", "metrics=[clip_score]"]
    evaluate(eval_config(tmp_path / "eager", *common))
    evaluate(eval_config(tmp_path / "compiled", *common, "compile=true"))
    for name in edits(tmp_path / "eager"):
        eager = read_image(tmp_path / "eager" / "edits" / name)
        compiled = read_image(tmp_path / "compiled" / "edits" / name)
        assert (eager - compiled).abs().max() <= 2 / 255


def test_device_auto_is_the_local_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    part = Part(0, 1, Processes(rank=5, world=8, local_rank=1))
    assert part.device("auto") == torch.device("cuda", 1)
    assert part.device("cuda") == torch.device("cuda", 1)
    assert part.device("cpu") == torch.device("cpu")
    assert part.device("cuda:3") == torch.device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert part.device("auto") == torch.device("cpu")


# --- SLURM: srun's tasks, an array and its scoring job -----------------------------------------
def sbatch(script: Path, env: dict, *options: str) -> str:
    """``sbatch OPTIONS SCRIPT``; returns the job id."""
    command = ["sbatch", "--parsable", *options, str(script)]
    submitted = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return submitted.stdout.strip().split(";")[0]


def evaluate_script(setup: dict, path: Path, srun: str, *extra: str) -> Path:
    """An sbatch script running ``srun [srun options] python evaluate.py`` on the benchmark."""
    args = " ".join([*setup["args"], "steps=8", *extra])
    path.write_text(
        f"""#!/bin/bash
#SBATCH --output={path.parent}/slurm-%A_%a.out --cpus-per-task=1
export HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1 PYTHONPATH={REPO}
export PBE_CACHE_DIR={setup["cache"]}
cd {path.parent}
srun {srun} {sys.executable} {REPO}/evaluate.py {args}
"""
    )
    return path


@pytest.mark.slow
@pytest.mark.skipif(
    bool(missing_binaries()) or os.geteuid() != 0,
    reason="needs root and Debian's slurm + munge (.ci/run installs them)",
)
def test_srun_tasks_and_an_array_with_its_scoring_job_give_the_edits_of_one_process(
    setup, single, tmp_path
):
    tasks, array = tmp_path / "tasks", tmp_path / "array"
    two_tasks = evaluate_script(setup, tmp_path / "tasks.sbatch", "", f"hydra.run.dir={tasks}")
    shard = evaluate_script(
        setup,
        tmp_path / "shard.sbatch",
        "",
        "shard=$SLURM_ARRAY_TASK_ID",
        "shards=$SLURM_ARRAY_TASK_COUNT",
        f"hydra.run.dir={array}",
    )
    score = evaluate_script(
        setup, tmp_path / "score.sbatch", "", "score_only=true", f"hydra.run.dir={array}"
    )
    with slurm_cluster(tmp_path / "cluster") as env:
        job = sbatch(two_tasks, env, "--ntasks-per-node=2")
        shards = sbatch(shard, env, "--array=0-1")
        scoring = sbatch(score, env, f"--dependency=afterok:{shards}")
        states = [wait_for_job(job, env, timeout=600), wait_for_job(shards, env, timeout=600)]
        if states[1] == "COMPLETED":  # else the scoring job would wait for ever
            states.append(wait_for_job(scoring, env, timeout=300))
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert states == ["COMPLETED"] * 3, logs[-4000:]
    assert "process 1 of 2 (slurm)" in logs
    for out in (tasks, array):
        assert edits(out) == edits(single), out
        assert report(out)["metrics"] == report(single)["metrics"]
    assert report(array)["counts"]["painted_this_run"] == 0  # the shards painted; it scored
