"""W&B online with no reachable server: wait ``init_timeout_s``, then log offline, warned once.

``wandb.init`` retries an unreachable server for ``init_timeout`` (90 s by default), then
raises ``CommError``; Lightning's ``WandbLogger`` lets that end the run before its first step
(a compute node without internet, a proxy that is down, a self-hosted server being restarted).
The run's numbers need no server while it trains: ``loggers.WandbLogger`` asks
:func:`with_init_timeout` for the wait and, when the server never answered, starts the same run
offline (:func:`go_offline`); ``wandb sync`` uploads it later, into the same run id.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def with_init_timeout(settings: Any, seconds: float) -> Any:
    """``settings`` (a ``wandb.Settings``, a dict or None) with ``init_timeout=seconds``."""
    if settings is None:
        return {"init_timeout": float(seconds)}
    if isinstance(settings, dict):
        return {**settings, "init_timeout": float(seconds)}
    settings.init_timeout = float(seconds)
    return settings


def server_unreachable(error: BaseException) -> bool:
    """``wandb.init``'s error for a server that never answered (refused, timed out, DNS); a
    server that answered and refused the key is the user's to fix, not a reason to go offline."""
    from wandb.errors import AuthenticationError, CommError

    return isinstance(error, CommError) and not isinstance(error, AuthenticationError)


def go_offline(wandb_init: dict, error: BaseException, seconds: float) -> None:
    """Turn the run's ``wandb.init`` arguments offline, and say so once."""
    import wandb

    # W&B's service still holds the failed attempt's run id ("run ID ... is in use"), and the
    # offline run keeps that id (one run per run folder): stop our service; init starts anew.
    wandb.teardown()
    # A service this process inherited (WANDB_SERVICE, exported by a parent that ran W&B: a
    # launcher, a sweep agent, a notebook) is not ours to stop and keeps holding the id, so the
    # offline run starts a service of its own.
    inherited = os.environ.pop("WANDB_SERVICE", None)
    wandb_init["mode"] = "offline"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    folder = wandb_init.get("dir") or "."
    if inherited:
        log.info("the offline run uses its own W&B service, not the inherited WANDB_SERVICE")
    log.warning(
        "W&B server %s did not answer within %.0f s (%s): logging this run offline under "
        "%s/wandb; `wandb sync` uploads it later (logger.wandb.init_timeout_s sets the wait)",
        server,
        seconds,
        reason,
        folder,
    )
