"""Command-line conveniences shared by the Hydra entry points."""

from __future__ import annotations

import re

# A brace range such as {000000..000999}: shard-list syntax, not a Hydra dict.
BRACE_RANGE = re.compile(r"\{[^{}]*\.\.[^{}]*\}|\{[^{}:]*,[^{}:]*\}")


def quote_brace_patterns(argv: list[str]) -> list[str]:
    """``key=/d/train-{000..099}.tar`` -> ``key="/d/train-{000..099}.tar"``, and inside lists:
    ``key=[/a/x-{000..009}.tar,/b.tar]`` -> ``key=["/a/x-{000..009}.tar",/b.tar]``.

    Hydra's override grammar reads ``{`` as the start of a dict and rejects the usual
    WebDataset shard pattern unless it is quoted; users should not have to know that.
    """
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            quoted.append(arg)
        elif value.startswith("[") and value.endswith("]"):
            elements = split_top_level(value[1:-1])
            quoted.append(f"{key}=[{','.join(_quoted(e) for e in elements)}]")
        else:
            quoted.append(f"{key}={_quoted(value)}")
    return quoted


def _quoted(value: str) -> str:
    if BRACE_RANGE.search(value) and not value.startswith(("'", '"', "[", "{")):
        return f'"{value}"'
    return value


def split_top_level(text: str) -> list[str]:
    """``a-{0..9}.tar,b-{x,y}.tar`` -> the two elements: commas inside braces, brackets or
    quotes do not split."""
    elements, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == "," and depth == 0:
            elements.append(text[start:i])
            start = i + 1
    return [*elements, text[start:]] if text else []
