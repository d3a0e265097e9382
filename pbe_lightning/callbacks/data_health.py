"""Counts the records the loader skipped, logs them, and stops a run fed broken data."""

from __future__ import annotations

import lightning as L

from pbe_lightning.data.samples import SKIP_REASONS
from pbe_lightning.logging_steps import is_logging_step
from pbe_lightning.stops import DataBroken


class DataHealth(L.Callback):
    """Logs ``data/skipped_<reason>`` (cumulative) and stops the run past ``max_skip_fraction``
    (:class:`~pbe_lightning.stops.DataBroken`: one ``error:`` line from the rank that met it).

    Counts ride along in each batch's ``stream_state`` (host integers, never sent to the
    device), so they cover every loader worker; they are per rank, which is what a fraction
    needs. Logged at logging steps only: a Python number logged becomes a device tensor.
    """

    def __init__(self, max_skip_fraction: float = 0.05, min_records: int = 1000) -> None:
        self.max_skip_fraction = max_skip_fraction
        self.min_records = min_records
        self.skipped = [0] * len(SKIP_REASONS)  # Python ints: counting never reads a tensor
        self.read = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stream_state = batch.get("stream_state")
        if stream_state is None:
            return
        self.skipped = [a + b for a, b in zip(self.skipped, stream_state.skipped)]
        self.read += stream_state.records_read
        if is_logging_step(trainer):
            for reason, count in zip(SKIP_REASONS, self.skipped):
                if count:
                    pl_module.log(f"data/skipped_{reason}", float(count), reduce_fx="max")
        fraction = sum(self.skipped) / max(self.read, 1)
        if self.read >= self.min_records and fraction > self.max_skip_fraction:
            counts = {r: c for r, c in zip(SKIP_REASONS, self.skipped) if c}
            raise DataBroken(
                f"{fraction:.1%} of {self.read} records were unusable ({counts}), over "
                f"callbacks.data_health.max_skip_fraction={self.max_skip_fraction}: the data is "
                "broken; the first skip of each reason was warned with its shard and key, and "
                "each skip is a line of <run>/skipped_records/stream*.tsv: clean the shards, or "
                "raise callbacks.data_health.max_skip_fraction if those records are expected"
            )

    def state_dict(self) -> dict:
        # By reason name, so checkpoints survive new reasons being added.
        return {"skipped": dict(zip(SKIP_REASONS, self.skipped)), "read": self.read}

    def load_state_dict(self, state: dict) -> None:
        saved = state["skipped"]
        self.skipped = [saved.get(reason, 0) for reason in SKIP_REASONS]
        self.read = state["read"]
