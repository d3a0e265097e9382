"""Logger glue: the resolved config in every logger, W&B runs closed, one W&B run per run folder.

One W&B run per training run, across resumes and requeues: W&B's own ``resume="auto"`` keeps the id in ``wandb/wandb-resume.json`` but deletes it when a
run ends cleanly, which is exactly how a preempted run ends here; so the id lives in the run
folder instead, and every restart of that folder logs into the same W&B run.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

RUN_ID_FILE = "wandb_run_id"


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
    """Give ``logger.wandb`` the run folder's id (unless the user set one) and ``resume``."""
    node = (cfg.get("logger") or {}).get("wandb")
    if not node or "_target_" not in node or node.get("id") or rank_zero_only.rank != 0:
        return  # other ranks never open the W&B run
    with open_dict(node):
        node.id = wandb_run_id(Path(cfg.paths.output_dir))
        node.resume = "allow"


@rank_zero_only
def save_resolved_config(cfg: DictConfig, loggers: list[Logger]) -> None:
    """The fully resolved config beside the outputs and in every logger (W&B: run config)."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)


@rank_zero_only
def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs: in a multirun all jobs share one process, and an open run would
    swallow the next job's metrics instead of starting its own run."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()
