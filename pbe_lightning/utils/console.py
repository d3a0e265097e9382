"""A quiet console: the progress bar, our own log lines and real problems.

What Lightning, W&B and torch print besides is silenced at its source where an option exists
(here, the model summary and progress bar callbacks, ``open_clip_infos_hidden`` in the
encoder), and otherwise filtered by exact message and category (``UPSTREAM_NOISE``,
``LightningChatter``): never a blanket filter.
"""

from __future__ import annotations

import logging
import os
import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning

# Upstream warnings that say nothing about this run, each filtered by message and category:
# (message regex, category, module regex or "" for any, why). Installed by quiet_console().
UPSTREAM_NOISE = [
    (r"Found \d+ module\(s\) in eval mode", Warning, "", "the frozen VAE and CLIP: on purpose"),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
        "Lightning 2.6 calls torch's deprecated LeafSpec(); for Lightning to change",
    ),
    (
        r"You're resuming from a checkpoint that ended before the epoch ended and your "
        r"dataloader is not resumable",
        PossibleUserWarning,
        "",
        "the stream resumes from the DataModule's own state (callbacks.rng_state): exact",
    ),
]
# Outside a SLURM job there is nothing to srun into: a machine with SLURM installed, no more.
SRUN_HINT = (
    r"The `srun` command is available on your system but is not used",
    PossibleUserWarning,
    "",
    "only said inside a SLURM job, where it may be a real mistake",
)


class LightningChatter(logging.Filter):
    """Lightning's info lines that say nothing about this run: the litlogger advert (printed
    unless a LitLogger is used), the TPU line on machines without one, and the normal end at
    ``trainer.max_steps`` (logged mid-bar, it ran into the bar's last line; the bar's
    ``step=N/N`` and our ``finished in`` line say it)."""

    HIDDEN = ("💡 Tip:", "TPU available: False", "`Trainer.fit` stopped: `max_steps=")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.HIDDEN)


def quiet_console() -> None:
    """Lightning's and W&B's console output, at the source (for this process)."""
    in_slurm_job = "SLURM_JOB_ID" in os.environ
    for message, category, module, _why in UPSTREAM_NOISE + ([] if in_slurm_job else [SRUN_HINT]):
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        # ``import lightning`` gives its logger a console handler of its own and lets it
        # propagate: under Hydra's root handlers (console and train.log) every Lightning
        # line was printed twice. Hydra's handlers print it once, and write it to the log.
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, LightningChatter) for f in rank_zero.filters):
        rank_zero.addFilter(LightningChatter())
    # W&B's version banner, the metrics' sparkline table at the end (metrics.csv and the run
    # hold them) and the "wandb sync" hint; where the run is written is still printed.
    # WANDB_QUIET=false brings them back.
    os.environ.setdefault("WANDB_QUIET", "true")
