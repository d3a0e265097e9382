"""Decided stops: the product ends a run on purpose, and says why in one line.

A config value that cannot work, a checkpoint that would run code, a resume with another
architecture, a diverged loss, broken data: each raises :class:`RunStopped` (or a subclass)
with one line naming the cause and the fix. The entry points (``train.py``, ``evaluate.py``,
``python -m pbe_lightning.edit`` / ``.export``) print it as ``error: <message>`` and exit 1
(:func:`stops_as_errors`); anything else is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1``
keeps the traceback of decided stops too. The shutdown exits (3: a step that never finished,
4: a second signal; ``shutdown.py``) are separate codes and stay so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_STOPPED = 1  # a decided stop; the shutdown codes 3 and 4 mean something else


class RunStopped(RuntimeError):
    """The product stopped the run on purpose. The message: one line per problem, each naming
    the cause and the fix.

    Raised in a DataLoader worker, it reaches the main process re-raised by torch as
    ``RunStopped("Caught RunStopped in DataLoader worker process 0.\\nOriginal Traceback ...")``:
    the constructor keeps only the original message.
    """

    # False: every rank meets the same stop (a config, a checkpoint, all-reduced gradients), so
    # rank zero alone prints it. True: one rank's own data caused it, so that rank prints it.
    rank_local = False

    def __init__(self, message: str = "") -> None:
        super().__init__(original_message(str(message)))


class DataBroken(RunStopped):
    """The data this rank reads is unusable (skips past the limit, every shard failing)."""

    rank_local = True


def original_message(message: str) -> str:
    """The message a loader worker raised, out of torch's re-raised wrapper (else as is)."""
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]  # "pbe_lightning.stops.DataBroken: <message>"
    return last.split(": ", 1)[1] if ": " in last else last


def current_rank() -> int:
    """This process's global rank: Lightning's (set by the trainer, else read from the
    launcher's environment: RANK, LOCAL_RANK, SLURM_PROCID), 0 for a single process."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def stop_lines(stop: RunStopped, rank: int) -> str | None:
    """``error: <line>`` per line of the message, as ``rank`` prints them: rank zero, or the
    rank whose own data stopped (labelled); None for the other ranks, which exit quietly."""
    if rank != 0 and not stop.rank_local:
        return None
    label = "error: " if rank == 0 else f"error: [rank {rank}] "
    lines = str(stop).splitlines() or [type(stop).__name__]
    return "\n".join(label + line for line in lines)


@contextmanager
def stops_as_errors() -> Iterator[None]:
    """Around an entry point's work: a :class:`RunStopped` ends the process with its lines
    on stderr (``error: ...``) and exit code 1, without a traceback, unless
    ``HYDRA_FULL_ERROR=1``. (``SystemExit(text)``: Python prints the text, exits 1.)"""
    try:
        yield
    except RunStopped as stop:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(stop_lines(stop, current_rank()) or EXIT_STOPPED) from None
