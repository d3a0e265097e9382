"""``train(cfg)``: a plain function from a composed config to a fitted model and its metrics.

The console shows the progress bar, our own log lines and real problems
(``pbe_lightning/utils/console.py``, the model summary and progress bar callbacks).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

import pbe_lightning.utils.resolvers  # noqa: F401  (registers ${pbe.*} for the trainer configs)
from pbe_lightning.checkpoints import (
    AtomicCheckpointIO,
    check_same_architecture,
    newest_readable,
    remove_stale_writes,
    saved_architecture,
)
from pbe_lightning.models.build import build_model
from pbe_lightning.peers import PeerWatch
from pbe_lightning.safe_load import trusted_files
from pbe_lightning.shutdown import EXIT_STALLED, SHUTDOWN, StalledShutdown
from pbe_lightning.slurm import cluster_plugins, requeue_job
from pbe_lightning.stops import RunStopped
from pbe_lightning.utils.config_checks import check_config, value
from pbe_lightning.utils.console import quiet_console
from pbe_lightning.utils.instantiators import instantiate, instantiate_each
from pbe_lightning.utils.loggers import finish_loggers, keep_one_wandb_run, save_resolved_config

log = logging.getLogger(__name__)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=last``: this run folder's newest readable checkpoint, if there is one.

    A job restarted by a scheduler runs the same command; on its first start there is no
    checkpoint yet, and that must start fresh rather than fail. An unreadable ``last.ckpt``
    (copied half-way, a full disk) falls back to the newest readable one instead of failing
    on every requeue.
    """
    path = cfg.get("ckpt_path")
    if path != "last":
        if path and not Path(path).is_file():  # check_config says so first
            raise RunStopped(
                f"ckpt_path={path} does not exist: pass an existing checkpoint or ckpt_path=last"
            )
        return path
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    found = newest_readable(folder)
    if found is None:
        log.info("ckpt_path=last but %s holds no checkpoint yet: starting fresh", folder)
        return None
    log.info("resuming from %s", found)
    return str(found)


def trusted_by_user(cfg: DictConfig) -> list[str]:
    """What ``trust_checkpoint=true`` lets load with ``weights_only=False`` (it can run code
    from them): the checkpoint to resume (``ckpt_path=last``: this run folder's checkpoints)
    and ``model.init_from``. Nothing without it."""
    if value(cfg, "trust_checkpoint") is not True:
        return []
    ckpt_path, init_from = value(cfg, "ckpt_path"), value(cfg, "model.init_from")
    if ckpt_path == "last":
        ckpt_path = str(Path(cfg.paths.output_dir) / "checkpoints")
    return [p for p in (ckpt_path, init_from) if isinstance(p, str) and p]


def resuming_in_place(cfg: DictConfig, ckpt_path: str | None) -> bool:
    """Whether this run continues from a checkpoint in its own checkpoint folder."""
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    return bool(ckpt_path) and Path(ckpt_path).resolve().parent == folder.resolve()


@rank_zero_only
def tidy_checkpoint_folder(cfg: DictConfig) -> None:
    remove_stale_writes(Path(cfg.paths.output_dir) / "checkpoints")


def make_trainer(cfg: DictConfig, loggers: list[Logger]) -> L.Trainer:
    plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []]
    callbacks = instantiate_each(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):
        # Lightning refuses a progress-bar callback when the bar is switched off.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    summary = cfg.trainer.get("enable_model_summary", True)
    if not summary:
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    if not loggers:  # logger=none: LearningRateMonitor refuses to start without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    # Ours in callbacks (callbacks.model_summary): Lightning adds none, and says nothing.
    summary = summary and not any(isinstance(c, ModelSummary) for c in callbacks)
    return instantiate(
        cfg.trainer,
        callbacks=[*callbacks, PeerWatch()],  # several ranks: a signal asks who is gone
        logger=loggers or False,
        enable_model_summary=summary,
        plugins=[*plugins, AtomicCheckpointIO(), *cluster_plugins()],
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Build data, model, callbacks, loggers and trainer from ``cfg``; fit; return metrics.

    A shutdown signal (``pbe_lightning/shutdown.py``) ends the fit after saving ``last.ckpt``;
    this returns normally then, so the process exits 0, and the job is requeued if the
    signal was the scheduler's requeue signal.

    Config values that cannot work raise :class:`~pbe_lightning.utils.config_checks.ConfigError`
    (one line per problem: the key and the fix) before anything is built or loaded; other
    decided stops raise :class:`~pbe_lightning.stops.RunStopped`. A checkpoint or weight file
    holding more than tensors is refused unless ``trust_checkpoint=true`` (``safe_load.py``).
    """
    if SHUTDOWN.saved:  # a multirun's next job, after Ctrl-C or a scheduler's signal
        log.warning("not starting %s: %s was received", cfg.paths.output_dir, SHUTDOWN.signal_name)
        return {}
    if not SHUTDOWN.requested:  # one received during start-up stops the first step
        SHUTDOWN.reset()
    replaced = SHUTDOWN.install()  # nothing when train.py already did, at start-up
    try:
        with trusted_files(*trusted_by_user(cfg)):
            return fit(cfg)
    finally:
        SHUTDOWN.restore(replaced)


def fit(cfg: DictConfig) -> dict[str, float]:
    """The body of ``train``, with shutdown signals handled."""
    check_config(cfg)
    quiet_console()
    if cfg.get("torch_threads"):  # experiment=demo: 1, its data worker has the other core
        torch.set_num_threads(cfg.torch_threads)
    # The same seed on every rank: identical initial weights (the UNet's new input channels,
    # the mapper, the learnable vector). Draws during training differ per rank: the batch's own
    # generators (pbe_lightning/batch_seeds.py) and callbacks.rng_state for the global ones.
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed: config_resolved.yaml
    # Data first: a wrong shard path fails in milliseconds, before any weights load.
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    ckpt_path = resolve_ckpt_path(cfg)
    # Read (safely) before the model is built: a file that would run code is refused at once.
    saved = saved_architecture(Path(ckpt_path)) if ckpt_path else None
    model = build_model(cfg.model)
    if ckpt_path:
        check_same_architecture(
            Path(ckpt_path),
            saved,
            model.architecture(datamodule.spec.resolution),
            cfg.get("allow_architecture_change", False),
        )
    tidy_checkpoint_folder(cfg)
    keep_one_wandb_run(cfg)
    loggers = instantiate_each(cfg.get("logger"))
    trainer = make_trainer(cfg, loggers)
    save_resolved_config(cfg, loggers)

    def wrap_up() -> None:
        finish_loggers(loggers)
        if SHUTDOWN.requeue_wanted and trainer.is_global_zero and requeue_job():
            # Not a finished job: the submitit launcher must not record a result for it.
            raise SystemExit(0)

    SHUTDOWN.after_save = [wrap_up]  # a shutdown that waited for data ends in the callback
    try:
        with warnings.catch_warnings():
            if resuming_in_place(cfg, ckpt_path):  # the folder's checkpoints are expected
                warnings.filterwarnings(
                    "ignore", message=r"Checkpoint directory .* is not empty", category=UserWarning
                )
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except StalledShutdown:
        # Several ranks: this one cannot join the others' collectives to save its state.
        SHUTDOWN.exit_now(EXIT_STALLED)
    except BaseException:
        finish_loggers(loggers)
        raise
    SHUTDOWN.finished.set()
    wrap_up()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("finished in %s: %s", os.path.abspath(cfg.paths.output_dir), metrics)
    return metrics
