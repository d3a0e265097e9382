"""Hydra's ``instantiate`` with user errors surfacing as themselves, and per-group instantiation."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """Hydra's instantiate, but a user's error (missing weights...) surfaces as itself.

    Hydra wraps every exception raised by a target in InstantiationException; the original
    type and message (which name the path and the override to fix it) are what users need.
    """
    try:
        return hydra_instantiate(cfg, **kwargs)
    except InstantiationException as error:
        if error.__cause__ is not None:
            raise error.__cause__ from None
        raise


def instantiate_each(group: DictConfig | None) -> list:
    """A config group holding named components (callbacks, loggers) -> their instances.

    An entry set to null (``callbacks.ema=null``) or without ``_target_`` is skipped.
    """
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]
