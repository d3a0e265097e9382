"""State-dict key helpers shared by the layouts: select, add and replace name prefixes."""

from __future__ import annotations

from collections.abc import Mapping

import torch

Tensors = dict[str, torch.Tensor]


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """The tensors whose names start with ``prefix``, under their names without it."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(prefix: str, state: Mapping[str, torch.Tensor]) -> Tensors:
    return {prefix + k: v for k, v in state.items()}


def rename_prefixes(state: Mapping[str, torch.Tensor], prefixes: Mapping[str, str]) -> Tensors:
    """The tensors under the ``prefixes`` keys, those prefixes replaced by their values."""
    return {
        new + k[len(old) :]: v
        for old, new in prefixes.items()
        for k, v in state.items()
        if k.startswith(old)
    }
