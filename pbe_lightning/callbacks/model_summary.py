"""Lightning's model summary at the start of fit, without its FLOPs column.

Lightning 2.6 counts FLOPs only by running the module's ``example_input_array``; ours has
none (a batch is a dict of images, masks and exemplars), so its summary prints a column of
zeros and ``Total FLOPs: 0``, and no option turns them off. This is its plain-text table
less that column, logged (so it also lands in the run folder's ``train.log``).

Under ``bf16-mixed`` or ``16-mixed`` precision Lightning warns that the summary's model size
"will not be accurate" and uses 32 bits: mixed precision keeps the weights in float32, so the
size is exact, and that warning is left out too.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger(__name__)


def format_table(columns: list[tuple[str, list[str]]]) -> list[str]:
    widths = [max([len(name), *(len(str(v)) for v in values)]) for name, values in columns]
    header = " | ".join(name.ljust(width) for (name, _), width in zip(columns, widths))
    rule = "-" * len(header)
    rows = [
        " | ".join(str(v).ljust(width) for v, width in zip(row, widths))
        for row in zip(*(values for _, values in columns))
    ]
    return [header, rule, *rows, rule]


class ModelSummary(LightningModelSummary):
    def _summary(self, trainer, pl_module):
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=r"Precision \S+-mixed is not supported by the model summary",
                category=UserWarning,
            )
            return super()._summary(trainer, pl_module)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        totals = [
            (get_human_readable_count(trainable_parameters), "Trainable params"),
            (
                get_human_readable_count(total_parameters - trainable_parameters),
                "Non-trainable params",
            ),
            (get_human_readable_count(total_parameters), "Total params"),
            (f"{model_size:,.3f}", "Total estimated model params size (MB)"),
            (total_training_modes["train"], "Modules in train mode"),
            (total_training_modes["eval"], "Modules in eval mode"),
        ]
        lines = format_table(columns) + [f"{value!s:<10}{label}" for value, label in totals]
        log.info("\n" + "\n".join(lines))
