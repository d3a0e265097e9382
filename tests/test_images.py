"""Panel grids: one row per sample, and column names written into the PNG."""

from __future__ import annotations

import pytest
import torch

from pbe_lightning.images import LABEL_HEIGHT, panel_grid, read_image, save_grid


def rows(count: int = 2, side: int = 64) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        [torch.rand(3, side, side, generator=generator), torch.ones(1, side, side)]
        for _ in range(count)
    ]


def test_labels_sit_above_their_columns_and_leave_the_panels_unchanged(tmp_path):
    plain = panel_grid(rows())
    labelled = panel_grid(rows(), labels=("source", "mask (white = edit)"))
    assert labelled.shape[1] == plain.shape[1] + LABEL_HEIGHT
    assert torch.equal(labelled[:, LABEL_HEIGHT:], plain)
    header, padding, side = labelled[:, :LABEL_HEIGHT], 2, 64
    for column in range(2):
        left = padding + column * (side + padding)
        assert header[:, :, left : left + side].amax() > 0.5, f"no text above column {column}"
    save_grid(labelled, tmp_path / "grid.png")  # a long label is cut to its column, not spilled
    assert read_image(tmp_path / "grid.png").shape[-2:] == labelled.shape[-2:]


def test_one_label_per_column():
    with pytest.raises(ValueError, match="3 labels for 2 columns"):
        panel_grid(rows(), labels=("a", "b", "c"))
