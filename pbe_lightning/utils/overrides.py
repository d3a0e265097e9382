"""Command-line conveniences shared by the Hydra entry points."""

from __future__ import annotations

import re

# A brace range such as {000000..000999}: shard-list syntax, not a Hydra dict.
BRACE_RANGE = re.compile(r"\{[^{}]*\.\.[^{}]*\}|\{[^{}:]*,[^{}:]*\}")


def quote_brace_patterns(argv: list[str]) -> list[str]:
    """``key=/d/train-{000..099}.tar`` -> ``key="/d/train-{000..099}.tar"``.

    Hydra's override grammar reads ``{`` as the start of a dict and rejects the usual
    WebDataset shard pattern unless it is quoted; users should not have to know that.
    """
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        needs_quotes = (
            sep
            and not arg.startswith("-")
            and BRACE_RANGE.search(value)
            and not value.startswith(("'", '"', "[", "{"))
        )
        quoted.append(f'{key}="{value}"' if needs_quotes else arg)
    return quoted
