"""When the host may read device values: at Lightning's logging steps, never in between.

A host read of a device value (``.item()``, ``bool(tensor)``, a Python float logged with
``self.log``, which becomes a device tensor) makes the CPU wait for the GPU to drain its
queue. Lightning itself reads logged metrics only at ``trainer.log_every_n_steps``; our
callbacks and checks read at the same steps, so between them the CPU can run ahead.
"""

from __future__ import annotations

import lightning as L


def is_logging_step(trainer: L.Trainer) -> bool:
    """Whether Lightning flushes logged metrics at the end of the current training step.

    Lightning's own predicate (a private property, stable through 2.x): the public
    ``log_every_n_steps`` alone does not say which counter it is applied to.
    """
    return bool(trainer._logger_connector.should_update_logs)
