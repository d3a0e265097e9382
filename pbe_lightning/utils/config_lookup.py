"""Reading a composed config without tripping on what is not there: the lookups the config
checks share (``config_checks``, ``file_checks``, ``eval_checks``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

ABSENT = object()  # no such key, a ``???`` value, or an interpolation to one


def value(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``; :data:`ABSENT` where there is none to check (a missing
    ``???`` value is reported once, by :func:`missing_keys`, not by every check reading it)."""
    try:
        return OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationResolutionError):
        return ABSENT


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def missing_keys(node: DictConfig | ListConfig, prefix: str = "") -> Iterator[str]:
    """Every ``???`` key under ``node``, dotted; interpolations are not resolved (one that
    points at a ``???`` key is that key's problem, reported once)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            yield full
        elif not OmegaConf.is_interpolation(node, key):
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from missing_keys(child, full + ".")
