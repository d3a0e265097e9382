"""Evaluate every checkpoint of a sweep on a benchmark, in one table.

    python -m pbe_lightning.sweeps.eval_sweep multirun/train/<stamp> benchmark=COCOEE \\
        real_images=test_set_GT clip.checkpoint=/weights/clip_b32.bin qs_model=qs_gmm.npz \\
        [--checkpoints 'step_*.ckpt'] [--out DIR] [key=value ...]
    torchrun --nproc-per-node=8 -m pbe_lightning.sweeps.eval_sweep ...   # each checkpoint on 8 GPUs

``key=value``: evaluate.py's settings (``conf/eval.yaml``), the same for every checkpoint. Each
job's checkpoints (one per global step: ``sweeps.checkpoints``) are evaluated one after the
other exactly as ``python evaluate.py`` would, into ``<out>/<job>/step-<N>/`` (``out``: the
sweep's ``eval/``): edits, ``metrics.json``, ``grid.png``. Under torchrun or srun every
checkpoint is split over the processes (``eval_shards``), rank 0 scoring.

Then ``<out>/eval_table.md`` and ``.csv`` (``sweeps.eval_table``): a row per variant and step,
the benchmark's metrics beside training's ``val/*`` at that step and the job's summary row.
With ``logger=wandb``, each evaluation is a run of the sweep's W&B group (``job_type=eval``,
``eval/<run>@step-N``) and the table is logged there too, as ``eval/sweep_table``.

Run it again as the sweep goes on (or after an interruption): a checkpoint whose
``metrics.json`` was written with the same settings is not evaluated again, and an evaluation
cut short resumes its edits.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from pbe_lightning.eval_shards import PROCESS_KEYS, launched_processes
from pbe_lightning.safe_load import TRUST_FIX, check_loadable, trusted_files
from pbe_lightning.stops import stops_as_errors
from pbe_lightning.sweeps.checkpoints import Checkpoint, sweep_checkpoints
from pbe_lightning.sweeps.errors import SummaryError
from pbe_lightning.sweeps.eval_table import eval_rows, headline, write_table
from pbe_lightning.sweeps.jobs import read_jobs
from pbe_lightning.sweeps.table import choose_metric, direction, metric_columns, table_rows
from pbe_lightning.utils.eval_checks import eval_config_problems
from pbe_lightning.utils.loggers import DEFAULT_PROJECT

log = logging.getLogger(__name__)
CHECKOUT_CONF = Path(__file__).resolve().parents[2] / "conf"
# Settings that change neither an edit nor a metric: a report made with others is reused.
NOT_DECIDING = {*PROCESS_KEYS, "device", "grid_items", "table_rows", "trust_checkpoint"}


# ---------------------------------------------------------------------------- configs


def compose_eval(overrides: list[str]) -> DictConfig:
    """``conf/eval.yaml`` with the command line's ``key=value`` overrides."""
    conf = Path.cwd() / "conf" if (Path.cwd() / "conf" / "eval.yaml").is_file() else CHECKOUT_CONF
    try:
        with initialize_config_dir(config_dir=str(conf.resolve()), version_base="1.3"):
            return compose("eval", overrides=overrides)
    except HydraException as error:
        raise SummaryError(f"{str(error).splitlines()[0]}: fix the key=value arguments") from None


def sweep_group(sweep: Path, wandb_groups: list[str | None]) -> str:
    """The W&B group of the sweep's training runs (``<experiment>+ablation=<grid>/<stamp>``),
    read from their configs, else made as train.py makes it from the sweep's choices."""
    named = next((g for g in wandb_groups if g), None)
    if named:
        return named
    choices = OmegaConf.select(OmegaConf.load(sweep / "multirun.yaml"), "hydra.runtime.choices")
    choices = choices or {}
    names = [str(choices["experiment"])] if choices.get("experiment") else []
    names += [f"ablation={choices['ablation']}"] if choices.get("ablation") else []
    return "+".join(names or ["sweep"]) + "/" + sweep.name


def checkpoint_config(base: DictConfig, checkpoint: Checkpoint, out: Path, group: str):
    """``base`` for one checkpoint: its path, its own output folder, the sweep's W&B group."""
    cfg = copy.deepcopy(base)
    with open_dict(cfg):
        cfg.ckpt_path = str(checkpoint.path)
        cfg.paths.output_dir = str(out / checkpoint.job.name / checkpoint.folder_name)
        wandb = (cfg.get("logger") or {}).get("wandb")
        if wandb and "_target_" in wandb and not wandb.get("group"):
            wandb.group = group
    return cfg


def check_all(configs: list[DictConfig]) -> None:
    """Every config's problems (each line once) before anything is painted."""
    problems = dict.fromkeys(line for cfg in configs for line in eval_config_problems(cfg))
    if problems:
        raise SummaryError("\n".join(problems))


# ---------------------------------------------------------------------------- evaluating


def deciding(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_DECIDING}


def finished_report(cfg: DictConfig) -> dict | None:
    """The checkpoint's metrics.json when it was made with these settings, else None."""
    path = Path(cfg.paths.output_dir) / "metrics.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    wanted = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()}
    wanted = {k: v for k, v in wanted.items() if k not in ("logger", "paths")}
    if wanted.get("resolution") is None:  # the report holds the one the checkpoint gave
        wanted["resolution"] = report.get("config", {}).get("resolution")
    return report if deciding(report.get("config", {})) == deciding(wanted) else None


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """One checkpoint as ``python evaluate.py`` evaluates it (refused if it holds code)."""
    from pbe_lightning.evaluate import evaluate  # the models and metrics: not for --help

    check_loadable(cfg.ckpt_path, TRUST_FIX)
    return evaluate(cfg)


def evaluate_all(configs: list[DictConfig], checkpoints: list[Checkpoint]) -> list[tuple]:
    """Each checkpoint's report, evaluated or reused; pairs (checkpoint, report) of rank 0."""
    evaluated = []
    for number, (cfg, checkpoint) in enumerate(zip(configs, checkpoints), 1):
        report = finished_report(cfg)
        label = f"{checkpoint.job.variant} @ step {checkpoint.step}"
        if report is None:
            log.info("[%d/%d] evaluating %s (%s)", number, len(configs), label, cfg.ckpt_path)
            report = evaluate_checkpoint(cfg)
        else:
            log.info("[%d/%d] %s: evaluated already", number, len(configs), label)
        if "metrics" in report:  # rank 0; the other processes only painted
            evaluated.append((checkpoint, report))
    return evaluated


def log_table_to_wandb(base: DictConfig, rows: list[dict], group: str, out: Path) -> None:
    """The table as ``eval/sweep_table`` in a run of the sweep's W&B group."""
    import wandb

    settings = base.logger.wandb
    offline = settings.get("offline") and "WANDB_MODE" not in os.environ
    run = wandb.init(
        project=settings.get("project") or DEFAULT_PROJECT,
        group=group,
        job_type="eval",
        name=f"eval/sweep-table/{out.parent.name}",
        dir=str(out),
        mode="offline" if offline else None,
        config={"eval": OmegaConf.to_container(base, resolve=False)},
    )
    try:
        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        run.log({"eval/sweep_table": table})
    finally:
        run.finish()


# ---------------------------------------------------------------------------- the command


def summary_rows(jobs: list) -> dict[str, dict]:
    """``sweeps.summary``'s row of each job, by job name (empty when none logged a metric)."""
    try:
        metric = choose_metric(jobs, None)
    except SummaryError:
        return {}
    metrics = metric_columns(jobs, metric)
    rows = table_rows(jobs, metrics, {m: direction(m) for m in metrics})
    return {row["job"]: row for row in rows}


def evaluate_sweep(
    sweep: Path, overrides: list[str], pattern: str = "*.ckpt", out: Path | None = None
) -> tuple[list[dict], list[Path]]:
    """Evaluate the sweep's checkpoints; returns the table's rows and files (rank 0; the other
    processes of a torchrun return nothing)."""
    out = Path(out) if out else sweep / "eval"
    base = compose_eval(overrides)  # ckpt_path: each checkpoint's, below
    jobs = read_jobs(sweep, time.time())
    with trusted_files(sweep if base.trust_checkpoint is True else None):
        checkpoints = sweep_checkpoints(jobs, pattern)
        group = sweep_group(sweep, [job.wandb_group for job in jobs])
        configs = [checkpoint_config(base, c, out, group) for c in checkpoints]
        check_all(configs)
        evaluated = evaluate_all(configs, checkpoints)
    if launched_processes().rank != 0:
        return [], []
    rows = eval_rows(evaluated, summary_rows(jobs), jobs)
    files = write_table(rows, jobs, sweep, out)
    if "_target_" in ((base.get("logger") or {}).get("wandb") or {}):
        log_table_to_wandb(base, rows, group, out)
    return rows, files


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pbe_lightning.sweeps.eval_sweep",
        description="Evaluate every checkpoint of a sweep (python train.py -m ...) on a "
        "benchmark as evaluate.py does, and write one table of the metrics per variant and step.",
    )
    parser.add_argument("sweep", help="the multirun folder, multirun/train/<stamp>")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="evaluate.py's key=value settings, e.g. benchmark=COCOEE real_images=test_set_GT",
    )
    parser.add_argument(
        "--checkpoints",
        default="*.ckpt",
        help="which files of each job's checkpoints/ (default: all; one per step)",
    )
    parser.add_argument("--out", help="where the evaluations and the table go (SWEEP/eval)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    args = parse_args(argv)
    if "ckpt_path" in {o.partition("=")[0].lstrip("+") for o in args.overrides}:
        raise SystemExit("error: ckpt_path comes from the sweep's jobs: leave it out")
    try:
        with stops_as_errors():  # a refused checkpoint: one line, as evaluate.py says it
            rows, files = evaluate_sweep(
                Path(args.sweep), args.overrides, args.checkpoints, args.out
            )
    except SummaryError as error:
        raise SystemExit("\n".join(f"error: {line}" for line in str(error).splitlines())) from None
    if files:
        print(files[0].read_text())
        print("wrote " + ", ".join(str(p) for p in files))
        log.info("%s", headline(rows, [c for c in rows[0] if c.startswith("eval/")]))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
