"""One W&B run per training run, across resumes and requeues.

W&B's own ``resume="auto"`` keeps the id in ``wandb/wandb-resume.json`` but deletes it when a
run ends cleanly, which is exactly how a preempted run ends here; so the id lives in the run
folder instead, and every restart of that folder logs into the same W&B run.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

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
