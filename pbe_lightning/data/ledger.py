"""The skip ledger: every skipped record or shard, one line each, so a dataset can be cleaned.

Tab-separated: shard URL, record key (``-`` for a whole shard), reason (``SKIP_REASONS``),
detail. Each writer (a rank's loader stream, or ``inspect``) has a file of its own, so no two
processes ever append to one; ``cat`` the folder's files for the whole run. Files are only
appended to: a resumed run continues them, and records a killed run had prefetched but never
trained on may appear twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO


class SkipLedger:
    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._file: TextIO | None = None

    def write(self, url: str, key: str, reason: str, detail: str) -> None:
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (lives with the stream)
        fields = (url, key or "-", reason, detail[:500])
        self._file.write("\t".join(" ".join(str(f).split()) for f in fields) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_ledger(folder_or_file: str | Path) -> list[tuple[str, str, str, str]]:
    """All lines of a ledger file, or of every ledger file in a folder."""
    path = Path(folder_or_file)
    files = sorted(path.glob("*.tsv")) if path.is_dir() else [path]
    return [tuple(line.split("\t", 3)) for f in files for line in f.read_text().splitlines()]
