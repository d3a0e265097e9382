"""The files a training config names, checked up front: do they exist, are they the right kind.

Each check returns its problems, one line each naming the key, the path and the fix, so that
``check_config`` lists every wrong path of a run at once: the Stable Diffusion weights
(``model.backbone.path``), the CLIP weights (``model.encoder.checkpoint`` or ``local-dir:``),
``model.init_from``, the shards, ``ckpt_path``, and every ``???`` key left unset. Only
existence and names are checked (no file is opened), so a sweep can check every job cheaply;
what a file holds is checked when it loads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pbe_lightning.models.encoder_weights import FAMILIES, weights_problems
from pbe_lightning.safe_load import WEIGHT_FILE_SUFFIXES
from pbe_lightning.utils.config_lookup import ABSENT, missing_keys, value

INIT_FROM_FIX = (
    "pass model.init_from=<official Paint-by-Example .ckpt/.safetensors, or a "
    "PaintByExamplePipeline folder>"
)
BACKBONE_FIX = (
    "pass model.backbone.path=<diffusers folder or SD .safetensors/.ckpt file>, "
    "or use model/backbone=tiny"
)
ENCODER_FIX = "or use model/encoder=tiny"
BUILD_ENCODER = "pbe_lightning.models.encoder.build_exemplar_encoder"
# What to pass for a ``???`` key: shown after "pass KEY=".
EXAMPLES = {
    "model.init_from": "<official Paint-by-Example .ckpt/.safetensors, or a pipeline folder>",
    "ckpt_path": "outputs/train/<run>/checkpoints/last.ckpt (a checkpoint written by train.py)",
    "benchmark": "<the benchmark's folder: COCOEE, or one written by data/make_cocoee.py>",
    "real_images": "<a folder of real images: the FID reference set, e.g. COCO test images>",
}
# ``???`` keys another check reports, only where they are used: the metrics' CLIP weights are
# needed only while callbacks.edit_metrics is on (config_checks.check_edit_metrics).
REPORTED_ELSEWHERE = ("metrics_clip.",)


def check_required(cfg: DictConfig) -> list[str]:
    """Every ``???`` key the user has to set, named with what to pass."""
    return [
        f"{key} is not set (??? in the config): pass {key}={EXAMPLES.get(key, '...')}"
        for key in missing_keys(cfg)
        if not key.startswith(REPORTED_ELSEWHERE)
    ]


def check_backbone(cfg: DictConfig) -> list[str]:
    """``model.backbone.path``: a diffusers folder (``vae/``, ``unet/``) or one SD file."""
    if value(cfg, "model.backbone.path") is ABSENT:  # model/backbone=tiny, or a ??? upstream
        return []
    path = value(cfg, "model.backbone.path")
    if path == value(cfg, "model.init_from"):
        return []  # experiment=finetune builds the backbone from model.init_from, checked there
    if not path:
        return [f"model.backbone.path is not set: {BACKBONE_FIX}"]
    source = Path(str(path)).expanduser()
    if not source.exists():
        return [f"model.backbone.path={path}: no such file or folder: {BACKBONE_FIX}"]
    if source.is_dir():
        absent = [p for p in ("vae", "unet") if not (source / p / "config.json").is_file()]
        if absent:
            return [
                f"model.backbone.path={path} has no {absent[0]}/config.json, so it is not a "
                f"diffusers folder: {BACKBONE_FIX}"
            ]
    elif source.suffix not in WEIGHT_FILE_SUFFIXES:
        return [
            f"model.backbone.path={path} is neither a diffusers folder nor a "
            f"{'/'.join(WEIGHT_FILE_SUFFIXES)} file: {BACKBONE_FIX}"
        ]
    return []


def clip_weights_problem(arch: object, checkpoint: object, key: str, fix: str) -> str | None:
    """An open_clip model from local weights: ``local-dir:<folder>`` or ``arch`` + a file."""
    if not isinstance(arch, str):
        return None
    if arch.startswith("local-dir:"):
        folder = Path(arch.removeprefix("local-dir:")).expanduser()
        if (folder / "open_clip_config.json").is_file():
            return None
        return (
            f"{key.rsplit('.', 1)[0]}.arch={arch}: no open_clip model there (needs "
            f"open_clip_config.json + weights): fix the path, {fix}"
        )
    if not checkpoint:
        return (
            f"{key} is not set: pass {key}=/path/to/open_clip_pytorch_model.bin (local weights "
            f"for {arch}; nothing is downloaded), {fix}"
        )
    if not Path(str(checkpoint)).expanduser().is_file():
        return f"{key}={checkpoint}: no such file (local weights for {arch}): fix the path, {fix}"
    return None


def check_encoder(cfg: DictConfig) -> list[str]:
    """``model.encoder``: its family's weights, from a local file or a ``local-dir:`` folder
    (``models/encoder_weights.py``). The demo's tiny encoders write their own, so only the
    production builder's are checked."""
    if value(cfg, "model.encoder._target_") != BUILD_ENCODER:  # model/encoder=tiny, demo, ...
        return []
    family = value(cfg, "model.encoder.family")
    family = "clip" if family is ABSENT else family
    if family not in FAMILIES:
        return [f"model.encoder.family={family}: use one of {sorted(FAMILIES)}"]
    arch, checkpoint = value(cfg, "model.encoder.arch"), value(cfg, "model.encoder.checkpoint")
    if arch is ABSENT:  # a ??? value: check_required names it
        return []
    return weights_problems(family, arch, None if checkpoint is ABSENT else checkpoint, ENCODER_FIX)


def check_init_from(cfg: DictConfig) -> list[str]:
    """``model.init_from`` (experiment=finetune): trained weights that exist."""
    path = value(cfg, "model.init_from")
    if path is ABSENT or not path or Path(str(path)).expanduser().exists():
        return []
    return [f"model.init_from={path}: no weights there: {INIT_FROM_FIX}"]


def shard_problems(shards: object, key: str) -> list[str]:
    """A shard list that is unset, matches nothing, or names local files that are not there."""
    from pbe_lightning.data.datamodule import check_local_shards, expand_urls

    if not shards:
        return [
            f"{key} is not set: pass {key}='/data/train-{{000000..000999}}.tar' (a brace "
            "pattern, glob or list of shard paths/URLs), or use data=demo"
        ]
    patterns = OmegaConf.to_container(shards) if OmegaConf.is_config(shards) else shards
    try:
        check_local_shards(expand_urls(patterns), key)
    except (FileNotFoundError, ValueError) as error:
        return [str(error)]
    return []


WEBDATASET = "pbe_lightning.data.datamodule.PaintByExampleDataModule"


def writes_own_shards(cfg: DictConfig, shards: object) -> bool:
    """``data=demo`` writes the shards under its ``demo_dir`` when it starts: those need not
    exist yet (shards pointed elsewhere must)."""
    if value(cfg, "data._target_") == WEBDATASET:
        return False
    demo_dir = value(cfg, "data.demo_dir")
    return isinstance(shards, str) and demo_dir is not ABSENT and shards.startswith(str(demo_dir))


def check_shards(cfg: DictConfig) -> list[str]:
    """``data.shards`` and ``data.val_shards``: a pattern that matches nothing, or local files
    that are not there (except the shards ``data=demo`` is about to write)."""
    shards = value(cfg, "data.shards")
    if shards is ABSENT or writes_own_shards(cfg, shards):
        return []
    val_shards = value(cfg, "data.val_shards")
    unchecked = val_shards in (ABSENT, None) or writes_own_shards(cfg, val_shards)
    val = [] if unchecked else shard_problems(val_shards, "data.val_shards")
    return shard_problems(shards, "data.shards") + val


def check_ckpt_path(cfg: DictConfig) -> list[str]:
    """``ckpt_path``: a checkpoint file, or ``last`` (this run folder's newest)."""
    path = value(cfg, "ckpt_path")
    if path in (ABSENT, None, "", "last") or Path(str(path)).expanduser().is_file():
        return []
    return [
        f"ckpt_path={path} does not exist: pass an existing checkpoint, or ckpt_path=last to "
        "continue this run folder"
    ]


FILE_CHECKS: tuple[Callable[[DictConfig], list[str]], ...] = (
    check_required,
    check_backbone,
    check_encoder,
    check_init_from,
    check_shards,
    check_ckpt_path,
)
