"""Logger glue: the resolved config in every logger, W&B runs closed, one W&B run per run folder,
checkpoints as W&B artifacts, and evaluation/export runs linked to their training run.

One W&B run per training run, across resumes and requeues: W&B's own ``resume="auto"`` keeps the id in ``wandb/wandb-resume.json`` but deletes it when a
run ends cleanly, which is exactly how a preempted run ends here; so the id lives in the run
folder instead, and every restart of that folder logs into the same W&B run.

Every training run with W&B has a group (a sweep's, or ``<experiment>/<run folder>`` for a
single run): the evaluation (``job_type=eval``) and export (``job_type=export``) runs of its
checkpoints join it, found from the run folder next to the checkpoint (:class:`TrainingRun`).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.utilities import _scan_checkpoints
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from pbe_lightning.safe_load import load_checkpoint
from pbe_lightning.utils.resolvers import selection
from pbe_lightning.utils.wandb_offline import go_offline, server_unreachable, with_init_timeout

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
CONFIG_FILE = "config_resolved.yaml"
DEFAULT_PROJECT = "pbe-lightning"
ARTIFACT_CHECKPOINT = "model.ckpt"  # the file name inside a checkpoint artifact (Lightning's)


def wandb_run_id(output_dir: Path) -> str:
    """This run folder's W&B id: read it, or make and keep one on the first start."""
    path = output_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def keep_one_wandb_run(cfg: DictConfig) -> None:
    """Give ``logger.wandb`` the run folder's id (unless the user set one) and ``resume``, and
    a single run a group of its own (``<experiment>/<run folder>``) for its eval/export runs."""
    node = (cfg.get("logger") or {}).get("wandb")
    if not node or "_target_" not in node or rank_zero_only.rank != 0:
        return  # other ranks never open the W&B run
    output_dir = Path(cfg.paths.output_dir)
    with open_dict(node):
        if not node.get("id"):
            node.id = wandb_run_id(output_dir)
            node.resume = "allow"
        if not node.get("group"):
            node.group = "+".join(selection() or ["run"]) + "/" + output_dir.name


@rank_zero_only
def save_resolved_config(cfg: DictConfig, loggers: list[Logger]) -> None:
    """The fully resolved config beside the outputs and in every logger (W&B: run config)."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)


@rank_zero_only
def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs: in a multirun all jobs share one process, and an open run would
    swallow the next job's metrics instead of starting its own run."""
    for logger in loggers:
        if isinstance(logger, LightningWandbLogger):
            import wandb

            wandb.finish()


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint's entries, tensors memory-mapped (cheap: nothing is copied);
    weights only, so a downloaded artifact's ``model.ckpt`` runs nothing (``safe_load``)."""
    return load_checkpoint(path, mmap=True)


def frozen_weights(checkpoint: dict) -> dict:
    """Where the checkpoint's frozen parts come from (they are not stored in it): the
    ``backbone`` and ``encoder`` nodes of its model config, which ``load_trained`` reads."""
    config = checkpoint.get("pbe_model_config") or {}
    return {part: config.get(part) for part in ("backbone", "encoder")}


# -- checkpoints as artifacts ------------------------------------------------------------------
class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` whose ``log_model`` works offline and logs reloadable artifacts.

    ``log_model`` as in Lightning: ``"all"`` logs every checkpoint ``ModelCheckpoint`` writes,
    when it writes it; ``True`` logs the ones it keeps when training ends; ``False`` none.
    Each is a version of the artifact ``model-<run id>`` (type ``model``) holding
    ``model.ckpt`` and the run's ``config_resolved.yaml``, aliased ``latest`` and
    ``step-<global step>`` (and ``best`` for ``ModelCheckpoint``'s best).

    What Lightning's own ``log_model`` (2.6) cannot do, and this class does:

    - work offline: it refuses ``offline=True`` ("checkpoints cannot be uploaded in offline
      mode"), although W&B keeps an offline run's artifacts (staged copies under
      ``$WANDB_DATA_DIR/artifacts/staging``) and ``wandb sync`` uploads them;
    - make an artifact that says how to reload it: Lightning's holds the checkpoint alone; here
      the resolved config goes beside it and the metadata names the global step and the frozen
      weights the checkpoint needs (``frozen_weights``: they are not stored in checkpoints);
    - alias by step (``step-N``), which evaluation and export runs reference;
    - log one version per step: ``last.ckpt`` and the periodic checkpoint of the same step are
      one model, Lightning logs it twice.

    Checkpoints saved by the preemption callback (on a shutdown signal) are not logged: they
    do not pass through ``ModelCheckpoint``.
    """

    def __init__(
        self,
        *args: Any,
        log_model: bool | str = False,
        init_timeout_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        if log_model not in (True, False, "all"):
            raise ValueError(f"logger.wandb.log_model={log_model!r}: use all, true or false")
        super().__init__(*args, log_model=False, **kwargs)  # Lightning's offline check
        self._log_model = log_model
        # No server within init_timeout_s: the run goes on offline (utils/wandb_offline.py).
        self._init_timeout_s = init_timeout_s
        settings = with_init_timeout(self._wandb_init.get("settings"), init_timeout_s)
        self._wandb_init["settings"] = settings
        # Lightning always passes anonymous=None, and wandb 0.19+ warns that the setting has
        # no effect whenever it is passed: left out, it is the same run without the warning.
        if self._wandb_init.get("anonymous", "") is None:
            del self._wandb_init["anonymous"]
        self._logged_steps: set[int] = set()

    @property
    def experiment(self) -> Any:
        """Lightning's, offline when the W&B server did not answer within init_timeout_s."""
        try:
            return super().experiment
        except Exception as error:
            if self._experiment is not None or not server_unreachable(error):
                raise
            go_offline(self._wandb_init, error, self._init_timeout_s)
            return super().experiment

    def _scan_and_log_checkpoints(self, checkpoint_callback: Any) -> None:
        import wandb

        for mtime, path, score, _ in _scan_checkpoints(
            checkpoint_callback, self._logged_model_time
        ):
            self._logged_model_time[path] = mtime
            checkpoint = read_checkpoint(path)
            step = int(checkpoint.get("global_step", 0))
            if step in self._logged_steps:
                continue  # last.ckpt beside step_N.ckpt: the same model
            metadata = {
                "global_step": step,
                "epoch": checkpoint.get("epoch"),
                "original_filename": Path(path).name,
                "run_folder": str(Path(self.save_dir or ".").resolve()),
                "frozen_weights": frozen_weights(checkpoint),
                "score": score.item() if isinstance(score, torch.Tensor) else score,
            }
            del checkpoint
            name = self._checkpoint_name or f"model-{self.experiment.id}"
            artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
            artifact.add_file(path, name=ARTIFACT_CHECKPOINT, policy=self.add_file_policy)
            config = Path(self.save_dir or ".") / CONFIG_FILE
            if config.is_file():
                artifact.add_file(str(config), name=CONFIG_FILE, policy="mutable")
            aliases = ["latest", f"step-{step}"]
            if path == checkpoint_callback.best_model_path:
                aliases.append("best")
            self.experiment.log_artifact(artifact, aliases=aliases)
            self._logged_steps.add(step)
            log.info("logged %s (step %d) as W&B artifact %s", path, step, name)


# -- evaluation and export runs join their training run ---------------------------------------
def artifact_safe(name: str) -> str:
    """W&B artifact names allow letters, digits, ``-``, ``_`` and ``.``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


@dataclass(frozen=True)
class TrainingRun:
    """The training run a checkpoint comes from, as the run folder next to it tells.

    The folder holding ``config_resolved.yaml``: ``<run>/`` for ``<run>/checkpoints/x.ckpt``,
    or the checkpoint's own folder (a downloaded checkpoint artifact: ``model.ckpt`` beside
    ``config_resolved.yaml``). Its ``logger.wandb`` gives the project, group, name and id
    (else the ``wandb_run_id`` file); without a folder, names fall back to the checkpoint's.
    """

    checkpoint: Path
    global_step: int
    folder: Path | None = None
    wandb: dict = field(default_factory=dict)  # the training run's resolved logger.wandb
    run_id: str | None = None

    @classmethod
    def of(cls, checkpoint: str | Path) -> TrainingRun:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {checkpoint}")
        step = int(read_checkpoint(path).get("global_step", 0))
        folder = next(
            (d for d in (path.parent, path.parent.parent) if (d / CONFIG_FILE).is_file()), None
        )
        if folder is None:
            return cls(path, step)
        config = OmegaConf.to_container(OmegaConf.load(folder / CONFIG_FILE))
        wandb = (config.get("logger") or {}).get("wandb") or {}
        run_id = wandb.get("id")
        if not run_id and (folder / RUN_ID_FILE).is_file():
            run_id = (folder / RUN_ID_FILE).read_text().strip()
        return cls(path, step, folder, wandb, run_id)

    @property
    def label(self) -> str:
        """The training run's W&B name, else its folder's name."""
        if self.wandb.get("name"):
            return str(self.wandb["name"])
        folder = self.folder or self.checkpoint.parent
        return folder.name or "run"

    def run_name(self, job_type: str) -> str:
        """A short W&B name for a run made from this checkpoint: ``eval/<run>@step-N``."""
        return f"{job_type}/{self.label}@step-{self.global_step}"

    @property
    def project(self) -> str:
        return self.wandb.get("project") or DEFAULT_PROJECT

    @property
    def group(self) -> str:
        """The training run's W&B group (a run from before groups: its folder's name)."""
        return self.wandb.get("group") or (self.folder or self.checkpoint.parent).name

    @property
    def artifact(self) -> str | None:
        """``model-<id>:step-N`` when the training run logged its checkpoints, else None."""
        if not self.run_id or not self.wandb.get("log_model"):
            return None
        name = self.wandb.get("checkpoint_name") or f"model-{self.run_id}"
        return f"{name}:step-{self.global_step}"

    def describe(self) -> dict:
        """The checkpoint and its training run, for a W&B run's config."""
        return {
            "path": str(self.checkpoint.resolve()),
            "global_step": self.global_step,
            "artifact": self.artifact,
            "training_run": {
                "folder": str(self.folder.resolve()) if self.folder else None,
                "id": self.run_id,
                "project": self.project,
                "group": self.group,
                "name": self.wandb.get("name"),
            },
        }


def join_training_run(cfg: DictConfig, job_type: str) -> TrainingRun:
    """Point ``cfg.logger.wandb`` (when W&B logs) at the training run of ``cfg.ckpt_path``:
    its project and group, ``job_type``, and the name ``<job_type>/<run>@step-N``. Values
    already set (a command-line ``logger.wandb.name=...``) are kept."""
    run = TrainingRun.of(cfg.ckpt_path)
    node = (cfg.get("logger") or {}).get("wandb")
    if node and "_target_" in node:
        defaults = {
            "project": run.project,
            "group": run.group,
            "name": run.run_name(job_type),
            "job_type": job_type,
        }
        with open_dict(node):
            for key, value in defaults.items():
                if node.get(key) is None:
                    node[key] = value
    return run


def use_checkpoint_artifact(experiment: Any, run: TrainingRun) -> bool:
    """Record the checkpoint's artifact as an input of ``experiment`` (a W&B run); False when
    there is none or W&B cannot (offline: ``use_artifact`` needs the server, so the artifact's
    name stays in the config, ``checkpoint.artifact``)."""
    if run.artifact is None or getattr(experiment, "offline", True):
        return False
    reference = f"{run.project}/{run.artifact}"
    try:
        experiment.use_artifact(reference, type="model")
    except Exception as error:  # not synced yet, deleted, or that step was never logged
        log.warning(
            "cannot use W&B artifact %s (%s): recording the checkpoint path", reference, error
        )
        return False
    return True


def log_export_artifact(
    exported: str | Path, checkpoint: str | Path, format: str, ema: bool, name: str | None = None
) -> tuple[str, Path]:
    """Log an exported pipeline folder or official file as a W&B artifact (type ``model``).

    The run: ``job_type=export``, in the training run's project and group, named
    ``export/<run>@step-N``, using the checkpoint's artifact when there is one online. Offline
    when the training run was (``logger.wandb.offline``) and ``WANDB_MODE`` says nothing.
    The artifact is ``name`` or ``pipeline-<run id>`` (diffusers) / ``official-<run id>``,
    ``-ema`` appended for EMA weights; aliases ``latest`` and ``step-N``.
    Returns the artifact's name and the W&B run's folder.
    """
    import wandb

    out = Path(exported).resolve()
    run = TrainingRun.of(checkpoint)
    kind = "pipeline" if format == "diffusers" else format
    name = name or f"{kind}-{artifact_safe(run.run_id or run.label)}" + ("-ema" if ema else "")
    offline = run.wandb.get("offline") and "WANDB_MODE" not in os.environ
    experiment = wandb.init(
        project=run.project,
        group=run.group,
        job_type="export",
        name=run.run_name("export"),
        dir=str(out.parent),
        mode="offline" if offline else None,
        config={
            "checkpoint": run.describe(),
            "export": {"format": format, "ema": ema, "out": str(out)},
        },
    )
    try:
        use_checkpoint_artifact(experiment, run)
        metadata = {"format": format, "ema": ema, "global_step": run.global_step}
        metadata |= {
            "checkpoint": str(run.checkpoint.resolve()),
            "checkpoint_artifact": run.artifact,
        }
        artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
        if out.is_dir():
            artifact.add_dir(str(out))
        else:
            artifact.add_file(str(out))
        experiment.log_artifact(artifact, aliases=["latest", f"step-{run.global_step}"])
        folder = Path(experiment.sync_dir)
    finally:
        experiment.finish()
    return name, folder
