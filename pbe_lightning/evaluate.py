"""``evaluate(cfg)``: paint every COCOEE benchmark item with a checkpoint, then score the edits.

    python evaluate.py ckpt_path=run/checkpoints/last.ckpt benchmark=cocoee real_images=coco_test \\
        clip.arch=ViT-B-32-quickgelu clip.checkpoint=/weights/clip_b32.bin qs_model=qs.npz

Writes into Hydra's run dir: ``edits/<id>.png`` (each edit at its source's size), ``metrics.json``,
``grid.png`` (source | mask | reference | edit) and, with ``logger=wandb``, a W&B table, in a
run that joins the checkpoint's training run (its project and group, ``job_type=eval``, named
``eval/<run>@step-N``, metrics at the checkpoint's global step; ``utils/loggers.py``).

Resuming: run again with ``hydra.run.dir=<that dir>``. An item whose ``edits/<id>.png`` exists is
not painted again (files are written atomically, so an existing one is complete).
``edits/settings.json`` records everything that decides the pixels; a resume with other values
is refused rather than mixing two settings in one set of edits.

Seeding: items are painted in fixed chunks of ``batch_size`` by manifest index ([0, B), [B, 2B),
...), each with a generator seeded ``seed + its first index``, the last chunk padded to full
size. An edit therefore depends only on (seed, batch_size, its index, its own inputs): neither
``limit`` nor an interruption changes it (on the same device and library versions). A chunk
with some edits missing is painted whole again and only the missing files are written.

QS needs a mixture fitted on real images (``qs_model``); without one it is skipped with a
warning (``"qs": null``), since FID and CLIP score are still worth the painting; score later
with ``python -m pbe_lightning.metrics qs --images <run dir>/edits --model qs.npz --clip ...``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

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
from pbe_lightning.inference import load_editor, make_batch, pick_device
from pbe_lightning.metrics import (
    FIT_QS,
    ClipFeatures,
    EditScores,
    GaussianMixture,
    load_quality_model_for,
)
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
METRICS = ("fid_clip", "qs", "clip_score", "fid_inception")
SKIPPED = {"qs": f"no qs_model; fit one with `{FIT_QS}`", "fid_inception": "no inception_weights"}
TABLE_COLUMNS = ("id", "category", "source", "mask", "reference", "edit", "clip_score")


@dataclass(frozen=True)
class Item:
    index: int  # position in the manifest: the seed and the chunk follow from it
    id: str
    source: Path
    mask: Path
    reference: Path
    category: str


def read_items(benchmark: str | Path, limit: int | None = None) -> list[Item]:
    root = Path(benchmark)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"no manifest.json in {root}: build one with data/make_cocoee.py")
    entries = json.loads((root / "manifest.json").read_text())["items"][:limit]
    paths = [[root / e[key] for key in ("source", "mask", "reference")] for e in entries]
    return [
        Item(i, str(e["id"]), *p, str(e.get("category", "")))
        for i, (e, p) in enumerate(zip(entries, paths))
    ]


def chunks(items: list[Item], size: int) -> list[list[Item]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def edit_path(folder: Path, item: Item) -> Path:
    return folder / f"{item.id}.png"


# --- painting -------------------------------------------------------------------------------
def generation_settings(cfg: DictConfig, resolution: int) -> dict:
    keys = ("sampler", "steps", "guidance_scale", "seed", "batch_size", "paste_back")
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
    record.write_text(json.dumps(settings, indent=1))


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
    painted = module.paint(batch, cfg.steps, cfg.guidance_scale, cfg.sampler, generator)
    edits = []
    for (source, mask, _), edit in zip(loaded, painted.float().cpu() * 0.5 + 0.5):
        edit = resize(edit[None], tuple(source.shape[-2:]))
        edits.append(composite(source, edit, mask) if cfg.paste_back else edit)
    return edits


def generate(
    module: PaintByExampleModule, items: list[Item], folder: Path, cfg: DictConfig, resolution: int
) -> int:
    """Paint the items that have no edit yet; returns how many were written."""
    missing = {item.index for item in items if not edit_path(folder, item).is_file()}
    todo = [c for c in chunks(items, cfg.batch_size) if any(i.index in missing for i in c)]
    with tqdm(total=len(missing), desc="painting", unit="edit") as progress:
        for chunk in todo:
            for item, edit in zip(chunk, paint_chunk(module, chunk, cfg, resolution)):
                if item.index in missing:
                    save_atomically(edit, edit_path(folder, item))
                    progress.update()
    return len(missing)


# --- metrics --------------------------------------------------------------------------------
def load_qs_model(path: str | None, clip_arch: str) -> GaussianMixture | None:
    if not path:
        log.warning("qs_model is not set: QS is skipped. Fit one with `%s`", FIT_QS)
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
    edits read back and scored by ``metrics.EditScores`` (training's EditMetrics uses it too)."""
    real_files = image_files(cfg.real_images)
    for start in range(0, len(real_files), cfg.batch_size):
        scores.add_real([read_image(f) for f in real_files[start : start + cfg.batch_size]])
    for chunk in tqdm(chunks(items, cfg.batch_size), desc="scoring", unit="batch"):
        edits = [read_image(edit_path(folder, item)) for item in chunk]
        boxes = [mask_bounding_box(read_user_mask(item.mask)[0]) for item in chunk]
        scores.add_edits(edits, boxes, [read_image(item.reference) for item in chunk])
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
    cfg: DictConfig, values: dict, counts: dict, seconds: dict, resolution: int
) -> dict:
    values = dict.fromkeys(METRICS) | values
    config = OmegaConf.to_container(cfg, resolve=True)
    return {
        "metrics": values,
        "counts": counts,
        "skipped": {name: why for name, why in SKIPPED.items() if values[name] is None},
        "seconds": seconds,
        "config": {k: v for k, v in config.items() if k not in ("logger", "paths")}
        | {"resolution": resolution},
    }


def evaluate(cfg: DictConfig) -> dict:
    """Paint the benchmark (resumably), score it, write metrics.json + grid; returns the report."""
    quiet_console()
    if cfg.batch_size < 1 or cfg.steps < 1 or cfg.sampler not in SAMPLERS:
        raise ValueError(
            f"batch_size={cfg.batch_size}, steps={cfg.steps} (both >= 1), sampler={cfg.sampler} "
            f"(one of {sorted(SAMPLERS)}): fix the override"
        )
    out, items = Path(cfg.paths.output_dir), read_items(cfg.benchmark, cfg.limit)
    if not items:
        raise ValueError(f"{cfg.benchmark}/manifest.json lists no items")
    device = pick_device(cfg.device)
    # Everything that can fail does so before hours of painting.
    image_files(cfg.real_images)
    clip = load_metric_clip(cfg, device)
    qs_model = load_qs_model(cfg.qs_model, cfg.clip.arch)
    scores = EditScores(clip, qs_model, inception_fid(cfg.inception_weights))
    run = join_training_run(cfg, "eval")  # W&B: the training run's group, eval/<run>@step-N
    loggers = instantiate_each(cfg.get("logger"))
    module, resolution = load_editor(cfg.ckpt_path, device, cfg.resolution)
    folder = out / "edits"
    claim_edits_folder(folder, generation_settings(cfg, resolution))

    started = time.perf_counter()
    painted = generate(module, items, folder, cfg, resolution)
    del module  # its memory is the metrics' now
    painted_at = time.perf_counter()
    values, clip_scores, real_count = score(items, folder, cfg, scores)
    counts = {"items": len(items), "painted_this_run": painted, "real_images": real_count}
    seconds = {"painting": painted_at - started, "scoring": time.perf_counter() - painted_at}
    report = make_report(cfg, values, counts, seconds, resolution)
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    write_grid(items[: cfg.grid_items], folder, out / "grid.png")
    table = [
        [item.id, item.category, item.source, item.mask, item.reference, edit_path(folder, item), s]
        for item, s in zip(items[: cfg.table_rows], clip_scores)
    ]
    log_results(loggers, report, table, out / "grid.png", run)
    log.info("metrics %s -> %s", report["metrics"], out / "metrics.json")
    return report
