"""``evaluate(cfg)``: paint every COCOEE benchmark item with a checkpoint, then score the edits.

    python evaluate.py ckpt_path=run/checkpoints/last.ckpt benchmark=COCOEE real_images=test_set_GT \\
        clip.checkpoint=/weights/clip_b32.bin qs_model=qs_gmm.npz

``benchmark`` is COCOEE as released (``GT_3500/``, ``Ref_3500/``, ``Mask_bbox_3500/``) or a
folder from data/make_cocoee.py; the layout is detected (``pbe_lightning.benchmark``). The
default metrics are the paper's, as its public tools compute them (``metrics.scores``):
``fid_clip``, ``qs``, ``clip_score``; ``metrics=[...]`` adds ours. A benchmark whose manifest
records each item's ground truth (the toy benchmark, ``python -m pbe_lightning.demo.benchmark``)
is also scored on exemplar following and copy-paste leakage (``metrics.exemplar``), with their
chance levels in ``metrics.json``; on others these are ``null``, ``skipped`` says why.

Writes into Hydra's run dir: ``edits/<id>.png`` (each edit at its source's size, named by the
item's id: the 12-digit COCO id for the released COCOEE, as the public scripts name their
results), ``metrics.json``, ``grid.png`` (source | mask | reference | edit) and, with
``logger=wandb``, a W&B table, in a run that joins the checkpoint's training run (its project
and group, ``job_type=eval``, named ``eval/<run>@step-N``, metrics at the checkpoint's global
step; ``utils/loggers.py``).

Resuming: run again with ``hydra.run.dir=<that dir>``. An item whose ``edits/<id>.png`` exists is
not painted again (files are written atomically, so an existing one is complete).
``edits/settings.json`` records everything that decides the pixels; a resume with other values
is refused rather than mixing two settings in one set of edits.

Seeding: items are painted in fixed chunks of ``batch_size`` by benchmark index ([0, B), [B, 2B),
...), each with a generator seeded ``seed + its first index``, the last chunk padded to full
size. An edit therefore depends only on (seed, batch_size, its index, its own inputs): neither
``limit`` nor an interruption changes it (on the same device and library versions). A chunk
with some edits missing is painted whole again and only the missing files are written.

QS needs a mixture (``qs_model``: the authors', imported with ``python -m pbe_lightning.metrics
import-gmm``, or one from ``fit-qs``); without one it is skipped with a warning (``"qs": null``),
since FID and CLIP score are still worth the painting; score later with
``python -m pbe_lightning.metrics qs --images <run dir>/edits --model qs_gmm.npz --clip ...``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from pbe_lightning.benchmark import Item, known_edit, read_items, silhouettes
from pbe_lightning.eval_shards import Part, check_painted, part_report, this_part
from pbe_lightning.images import (
    composite,
    image_files,
    mask_bounding_box,
    panel_grid,
    read_image,
    read_user_mask,
    resize,
    save_atomically,
    save_grid,
)
from pbe_lightning.inference import (
    PRECISIONS,
    load_editor,
    make_batch,
    painting_precision,
    speed_up,
)
from pbe_lightning.metrics import (
    FIT_QS,
    IMPORT_GMM,
    ClipFeatures,
    EditScores,
    GaussianMixture,
    load_quality_model_for,
)
from pbe_lightning.metrics.scores import EXEMPLAR_METRICS, FID_METRICS, check_metric_names
from pbe_lightning.models.module import PaintByExampleModule
from pbe_lightning.models.samplers import SAMPLERS
from pbe_lightning.utils.console import quiet_console
from pbe_lightning.utils.instantiators import instantiate_each
from pbe_lightning.utils.loggers import (
    TrainingRun,
    finish_loggers,
    join_training_run,
    use_checkpoint_artifact,
)

log = logging.getLogger(__name__)
TABLE_COLUMNS = ("id", "category", "source", "mask", "reference", "edit", "clip_score")


def chunks(items: list[Item], size: int) -> list[list[Item]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def edit_path(folder: Path, item: Item) -> Path:
    return folder / f"{item.id}.png"


# --- painting -------------------------------------------------------------------------------
def generation_settings(cfg: DictConfig, resolution: int) -> dict:
    keys = ("sampler", "steps", "guidance_scale", "seed", "batch_size", "paste_back")
    keys += ("precision", "channels_last", "compile")
    settings = {key: cfg[key] for key in keys}
    return {"ckpt_path": str(Path(cfg.ckpt_path).resolve()), "resolution": resolution, **settings}


def claim_edits_folder(folder: Path, settings: dict) -> None:
    """Record the settings of the edits in ``folder``, or refuse to mix in other ones."""
    record = folder / "settings.json"
    if record.is_file():
        old = json.loads(record.read_text())
        changed = {k: [old.get(k), v] for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise ValueError(
                f"{folder} holds edits made with other settings ({changed}, [old, new]): "
                "evaluate into a new run dir, or resume with the old values"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    # Atomically: the processes of a sharded run claim the folder at the same time.
    tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, record)


def load_item(item: Item) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source ``(1,3,H,W)``, mask ``(1,1,H,W)`` white = edit, reference; all in [0, 1]."""
    source = read_image(item.source)
    try:
        mask = read_user_mask(item.mask, (source.shape[-1], source.shape[-2]))
    except ValueError as error:
        raise ValueError(f"benchmark item {item.id}: {error}") from None
    return source, mask, read_image(item.reference)


def paint_chunk(
    module: PaintByExampleModule, chunk: list[Item], cfg: DictConfig, resolution: int
) -> list[torch.Tensor]:
    """Edits ``(1, 3, H, W)`` in [0, 1] at each source's size."""
    loaded = [load_item(item) for item in chunk]
    padded = loaded + [loaded[-1]] * (cfg.batch_size - len(loaded))  # see the module docstring
    batch = make_batch(*zip(*padded), resolution, module.encoder.image_size)
    batch = {key: value.to(module.device) for key, value in batch.items()}
    generator = torch.Generator(module.device).manual_seed(cfg.seed + chunk[0].index)
    # The public scripts paint under fp16 autocast (``precision: fp16``).
    with painting_precision(module.device, cfg.precision):
        painted = module.paint(batch, cfg.steps, cfg.guidance_scale, cfg.sampler, generator)
    edits = []
    for (source, mask, _), edit in zip(loaded, painted.float().cpu() * 0.5 + 0.5):
        edit = resize(edit[None], tuple(source.shape[-2:]))
        edits.append(composite(source, edit, mask) if cfg.paste_back else edit)
    return edits


def generate(
    module: PaintByExampleModule,
    items: list[Item],
    folder: Path,
    cfg: DictConfig,
    resolution: int,
    part: Part | None = None,
) -> int:
    """Paint the items that have no edit yet, of this process's ``part`` of the chunks (all
    without one; ``eval_shards``); returns how many were written."""
    mine = chunks(items, cfg.batch_size)
    mine = part.chunks(mine) if part is not None else mine
    missing = {i.index for chunk in mine for i in chunk if not edit_path(folder, i).is_file()}
    todo = [c for c in mine if any(i.index in missing for i in c)]
    with tqdm(total=len(missing), desc="painting", unit="edit") as progress:
        for chunk in todo:
            for item, edit in zip(chunk, paint_chunk(module, chunk, cfg, resolution)):
                if item.index in missing:
                    save_atomically(edit, edit_path(folder, item))
                    progress.update()
    return len(missing)


# --- metrics --------------------------------------------------------------------------------
def metric_names(cfg: DictConfig) -> list[str]:
    """``metrics`` (default: the paper's), plus ``fid_inception`` when ``inception_weights``,
    plus the exemplar scores (computed when the benchmark records ground truth)."""
    names = list(cfg.metrics)
    check_metric_names(names)
    if cfg.inception_weights and "fid_inception" not in names:
        names.append("fid_inception")
    return names + [name for name in EXEMPLAR_METRICS if name not in names]


def load_qs_model(path: str | None, clip_arch: str, names: list[str]) -> GaussianMixture | None:
    if not {"qs", "qs_percentile"} & set(names):
        return None
    if not path:
        log.warning(
            "qs_model is not set: QS is skipped. Import the authors' mixture with `%s`, or fit "
            "one with `%s`",
            IMPORT_GMM,
            FIT_QS,
        )
        return None
    return load_quality_model_for(path, clip_arch, "qs_model")


def inception_fid(weights: str | None) -> torch.nn.Module | None:
    """Inception FID from a local weights file (torch-fidelity's FID Inception), if asked."""
    if not weights:
        return None
    if not Path(weights).is_file():
        raise FileNotFoundError(f"inception_weights={weights}: no such file")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(
            "inception_weights needs torch-fidelity for the Inception network: "
            "`pip install torch-fidelity` (weights still come from your file), or drop the option"
        )
    return FrechetInceptionDistance(
        feature=2048, normalize=True, feature_extractor_weights_path=str(weights)
    )


def score(
    items: list[Item], folder: Path, cfg: DictConfig, scores: EditScores
) -> tuple[dict, list[float], int]:
    """Metric values, per-item region CLIP scores, and the number of real images: the saved
    edits read back and scored by ``metrics.EditScores`` (training's EditMetrics uses it too).
    Real images are read only when a score uses them (FID)."""
    uses_real = any(score.uses_real for score in scores.scores.values())
    real_files = image_files(cfg.real_images) if uses_real else []
    for start in tqdm(range(0, len(real_files), cfg.batch_size), desc="real images", unit="batch"):
        scores.add_real([read_image(f) for f in real_files[start : start + cfg.batch_size]])
    for chunk in tqdm(chunks(items, cfg.batch_size), desc="scoring", unit="batch"):
        edits = [read_image(edit_path(folder, item)) for item in chunk]
        boxes = [mask_bounding_box(read_user_mask(item.mask)[0]) for item in chunk]
        known = [known_edit(item, edit[0]) for item, edit in zip(chunk, edits)]
        scores.add_edits(edits, boxes, [read_image(item.reference) for item in chunk], known)
    return scores.compute(), scores.clip_scores, len(real_files)


# --- outputs --------------------------------------------------------------------------------
def write_grid(items: list[Item], folder: Path, path: Path, cell: int = 256) -> None:
    """One row per item: source | mask (white = edit) | reference | edit, each squashed."""
    rows = []
    for item in items:
        source, mask, reference = load_item(item)
        rows.append([source, mask, reference, read_image(edit_path(folder, item))])
    save_grid(panel_grid(rows, cell, labels=("source", "mask", "reference", "edit")), path)


def log_results(
    loggers: list[Logger], report: dict, table: list[list], grid: Path, run: TrainingRun
) -> None:
    """The metrics to every logger at the checkpoint's global step; W&B also gets the
    per-item table and the grid, and uses the checkpoint's artifact when it can (online,
    and the training run logged one; the config's ``checkpoint`` names it either way)."""
    metrics = {f"eval/{k}": v for k, v in report["metrics"].items() if v is not None}
    step = run.global_step
    for logger in loggers:
        checkpoint = run.describe()
        if isinstance(logger, WandbLogger):
            checkpoint["artifact_used"] = use_checkpoint_artifact(logger.experiment, run)
        logger.log_hyperparams(report["config"] | {"checkpoint": checkpoint})
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, WandbLogger):
            import wandb

            rows = [[*row[:2], *(wandb.Image(str(p)) for p in row[2:6]), row[6]] for row in table]
            logger.log_table("eval/items", columns=list(TABLE_COLUMNS), data=rows, step=step)
            logger.log_image("eval/grid", [str(grid)], step=step)
        logger.finalize("success")
    finish_loggers(loggers)  # flush W&B runs before evaluate returns


def load_metric_clip(cfg: DictConfig, device: torch.device) -> ClipFeatures:
    try:
        return ClipFeatures.load(cfg.clip.arch, cfg.clip.checkpoint).to(device)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"metrics CLIP (clip.arch, clip.checkpoint): {error}") from None


def make_report(
    cfg: DictConfig, scores: EditScores, values: dict, counts: dict, seconds: dict, resolution: int
) -> dict:
    """``metrics`` holds every requested name, ``null`` for a skipped one (``skipped`` says
    why); ``chance`` the chance level of the scores that define one."""
    values = dict.fromkeys([*scores.scores, *scores.skipped]) | values
    config = OmegaConf.to_container(cfg, resolve=True)
    return {
        "metrics": values,
        "chance": scores.chances(),
        "counts": counts,
        "skipped": dict(scores.skipped),
        "seconds": seconds,
        "config": {k: v for k, v in config.items() if k not in ("logger", "paths")}
        | {"resolution": resolution},
    }


def check_settings(cfg: DictConfig) -> None:
    if cfg.batch_size < 1 or cfg.steps < 1 or cfg.sampler not in SAMPLERS:
        raise ValueError(
            f"batch_size={cfg.batch_size}, steps={cfg.steps} (both >= 1), sampler={cfg.sampler} "
            f"(one of {sorted(SAMPLERS)}): fix the override"
        )
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision}: use fp16 (the paper's), bf16 or fp32")


def recorded_resolution(folder: Path) -> int:
    """The resolution the edits in ``folder`` were painted at (``score_only``)."""
    record = folder / "settings.json"
    if not record.is_file():
        raise FileNotFoundError(
            f"score_only=true: no edits to score in {folder} (no settings.json): paint them "
            "first, into the same hydra.run.dir"
        )
    return int(json.loads(record.read_text())["resolution"])


def paint_part(
    cfg: DictConfig, part: Part, items: list[Item], folder: Path, device: torch.device
) -> tuple[int, int]:
    """Load the checkpoint and paint this process's part of the benchmark (nothing with
    ``score_only``); returns the edits written and the resolution."""
    if cfg.score_only:
        resolution = recorded_resolution(folder)
        claim_edits_folder(folder, generation_settings(cfg, resolution))  # the same settings
        return 0, resolution
    module, resolution = load_editor(cfg.ckpt_path, device, cfg.resolution)
    speed_up(module, cfg.channels_last, cfg.compile)
    claim_edits_folder(folder, generation_settings(cfg, resolution))
    return generate(module, items, folder, cfg, resolution, part), resolution


def evaluate(cfg: DictConfig) -> dict:
    """Paint the benchmark (resumably), score it, write metrics.json + grid; returns the report.
    Several processes or jobs paint a part each, and one scores (``eval_shards``); the others
    return their count."""
    quiet_console()
    check_settings(cfg)
    names = metric_names(cfg)
    out, items = Path(cfg.paths.output_dir), read_items(cfg.benchmark, cfg.limit)
    if not items:
        raise ValueError(f"benchmark={cfg.benchmark} has no items")
    if len(items) < 2 and FID_METRICS & set(names):
        raise ValueError(
            f"FID needs at least 2 edits, the benchmark gives {len(items)} (limit={cfg.limit}): "
            f"raise limit, or leave {sorted(FID_METRICS & set(names))} out of metrics"
        )
    part = this_part(cfg.shard, cfg.shards, cfg.wait_min)
    device = part.device(cfg.device)  # LOCAL_RANK's GPU
    # Everything that can fail does so before hours of painting.
    if FID_METRICS & set(names):
        image_files(cfg.real_images)
    clip = load_metric_clip(cfg, device)
    qs_model = load_qs_model(cfg.qs_model, cfg.clip.arch, names)
    inception = inception_fid(cfg.inception_weights) if "fid_inception" in names else None
    truth = any(item.truth is not None for item in items)
    shapes = silhouettes(cfg.benchmark) if truth else None
    scores = EditScores(clip, qs_model, inception, names, truth, shapes)
    run = join_training_run(cfg, "eval")  # W&B: the training run's group, eval/<run>@step-N
    loggers = instantiate_each(cfg.get("logger")) if part.scores else []
    folder = out / "edits"

    started = time.perf_counter()
    painted, resolution = paint_part(cfg, part, items, folder, device)
    painted = part.total(painted)  # waits for every process: all is painted
    if not part.scores:
        return part_report(part, painted, folder)
    check_painted([edit_path(folder, item) for item in items], folder)
    painted_at = time.perf_counter()
    values, clip_scores, real_count = score(items, folder, cfg, scores)
    counts = {"items": len(items), "painted_this_run": painted, "real_images": real_count}
    seconds = {"painting": painted_at - started, "scoring": time.perf_counter() - painted_at}
    report = make_report(cfg, scores, values, counts, seconds, resolution)
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    write_grid(items[: cfg.grid_items], folder, out / "grid.png")
    per_item = clip_scores or [None] * len(items)  # no clip_score in metrics: no column values
    table = [
        [item.id, item.category, item.source, item.mask, item.reference, edit_path(folder, item), s]
        for item, s in zip(items[: cfg.table_rows], per_item)
    ]
    log_results(loggers, report, table, out / "grid.png", run)
    log.info("metrics %s -> %s", report["metrics"], out / "metrics.json")
    return report
