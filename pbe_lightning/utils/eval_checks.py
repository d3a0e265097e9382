"""evaluate.py's config checked up front: every mistake at once, one line each, before the
checkpoint, the CLIP or the benchmark load (``python evaluate.py`` alone lists what to pass).

Keys the config does not have are not checked, so the checks follow ``conf/eval.yaml`` as it
changes; each names the key and the fix, as ``config_checks`` does for training.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pbe_lightning.utils.config_checks import ConfigError, found, is_int, is_number, problem
from pbe_lightning.utils.config_lookup import ABSENT, value
from pbe_lightning.utils.file_checks import check_required, clip_weights_problem

CLIP_FIX = "or pass clip.arch=local-dir:/folder (nothing is downloaded)"
BOOLEANS = ("channels_last", "compile", "score_only")


def path_problem(cfg: DictConfig, key: str, kind: str, fix: str) -> str | None:
    """``key``'s path is not an existing ``kind`` ("file" or "folder"); unset keys pass."""
    path = value(cfg, key)
    if path in (ABSENT, None, ""):
        return None
    where = Path(str(path)).expanduser()
    if where.is_file() if kind == "file" else where.is_dir():
        return None
    return f"{key}={path}: no such {kind}: {fix}"


def check_eval_files(cfg: DictConfig) -> list[str]:
    """That the files and folders exist; what they hold is checked when they are read."""
    return found(
        path_problem(cfg, "ckpt_path", "file", "pass a checkpoint written by train.py"),
        path_problem(cfg, "benchmark", "folder", "pass the benchmark's folder"),
        path_problem(cfg, "real_images", "folder", "pass the folder of real images for FID"),
        path_problem(
            cfg,
            "qs_model",
            "file",
            "fit one with python -m pbe_lightning.metrics fit-qs, or qs_model=null",
        ),
        path_problem(cfg, "inception_weights", "file", "or inception_weights=null"),
        clip_weights_problem(
            value(cfg, "clip.arch"), value(cfg, "clip.checkpoint"), "clip.checkpoint", CLIP_FIX
        ),
    )


def check_eval_values(cfg: DictConfig) -> list[str]:
    from pbe_lightning.models.samplers import SAMPLERS

    def whole(low: int):
        return lambda x: is_int(x) and x >= low

    def whole_or_null(low: int):
        return lambda x: x is None or whole(low)(x)

    return found(
        problem(cfg, "batch_size", whole(1), "be a whole number >= 1", "e.g. batch_size=8"),
        problem(cfg, "steps", whole(1), "be a whole number >= 1", "e.g. steps=50"),
        problem(
            cfg,
            "sampler",
            lambda x: x in SAMPLERS,
            f"be one of {', '.join(sorted(SAMPLERS))}",
            "e.g. sampler=ddim",
        ),
        problem(
            cfg,
            "guidance_scale",
            lambda x: is_number(x) and x >= 0,
            "be a number >= 0",
            "e.g. guidance_scale=5.0 (1: no guidance)",
        ),
        problem(
            cfg,
            "resolution",
            whole_or_null(1),
            "be a whole number >= 1 (or null)",
            "e.g. resolution=null: the checkpoint's",
        ),
        problem(cfg, "limit", whole_or_null(1), "be a whole number >= 1 (or null)", "e.g. 100"),
        problem(cfg, "seed", whole(0), "be a whole number >= 0", "e.g. seed=0"),
    )


def check_eval_speed_and_parts(cfg: DictConfig) -> list[str]:
    """Precision and speed switches, and how the painting is split (``eval_shards``)."""
    from pbe_lightning.eval_shards import shared_folder_problem
    from pbe_lightning.inference import PRECISIONS

    def is_bool(x: object) -> bool:
        return isinstance(x, bool)

    shards = value(cfg, "shards")
    below = shards if is_int(shards) and shards >= 1 else None
    return found(
        problem(
            cfg,
            "precision",
            lambda x: x in PRECISIONS,
            f"be one of {', '.join(PRECISIONS)}",
            "e.g. precision=fp16 (the paper's)",
        ),
        *(problem(cfg, k, is_bool, "be true or false", f"e.g. {k}=false") for k in BOOLEANS),
        problem(cfg, "shards", lambda x: is_int(x) and x >= 1, "be a whole number >= 1", "e.g. 8"),
        problem(
            cfg,
            "shard",
            lambda x: is_int(x) and 0 <= x < (below or x + 1),
            f"be a whole number from 0 to shards-1{f' ({below - 1})' if below else ''}",
            "e.g. shard=$((SLURM_ARRAY_TASK_ID - 1)) for --array=1-N",
        ),
        problem(cfg, "wait_min", lambda x: is_number(x) and x > 0, "be minutes > 0", "e.g. 120"),
        shared_folder_problem(shards, value(cfg, "score_only")),
    )


def eval_config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of evaluate.py's ``cfg``, one line each; [] when it can run."""
    return (
        check_required(cfg)
        + check_eval_files(cfg)
        + check_eval_values(cfg)
        + check_eval_speed_and_parts(cfg)
    )


def check_eval_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of evaluate.py's ``cfg``."""
    problems = eval_config_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
