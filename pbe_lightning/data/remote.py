"""Opening a shard wherever it lives, failing fast instead of hanging.

Local paths open as files. ``pipe:CMD`` runs CMD and reads its output; ``s3://``, ``gs://``,
``http://`` and ``https://`` run the standard command-line tool for the scheme (``aws s3 cp``,
``gcloud storage cat``, ``curl``), which read credentials from the environment as users
already configure them. webdataset's ``gopen`` runs the same kind of pipes, but a command that
hangs blocks its read forever and a failing one is reported without its stderr; here a read
that sees no byte for ``timeout_s`` kills the command, and errors carry the command's stderr.
fsspec would need a filesystem package per store (s3fs, gcsfs) and their own credential
handling; the command-line tools are what cluster images already ship.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import shlex
import subprocess
import tempfile
from typing import BinaryIO

import psutil

COMMANDS = {
    "s3": "aws s3 cp {url} -",
    "gs": "gcloud storage cat {url}",
    "http": "curl --fail --silent --show-error --location {url}",
    "https": "curl --fail --silent --show-error --location {url}",
}


def scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def check_schemes(urls: list[str], option: str) -> None:
    """Refuse, before anything is read, a URL no opener here handles."""
    unknown = sorted({scheme(u) for u in urls} - {"", "pipe", *COMMANDS})
    if unknown:
        example = next(u for u in urls if scheme(u) == unknown[0])
        raise ValueError(
            f"{option}: no way to read {unknown[0]}:// URLs such as {example}; use a local path, "
            "s3://, gs://, http(s)://, or pipe:<command writing the tar to stdout>"
        )


def is_local(url: str) -> bool:
    return scheme(url) == ""


def command_for(url: str) -> str | None:
    """The shell command that writes the shard to stdout, or None for a local file."""
    kind = scheme(url)
    if kind == "pipe":
        return url[len("pipe:") :]
    if kind in COMMANDS:
        return COMMANDS[kind].format(url=shlex.quote(url))
    return None


def open_shard(url: str, timeout_s: float) -> BinaryIO:
    command = command_for(url)
    if command is None:
        return open(url, "rb")  # noqa: SIM115 (the reader closes it)
    return io.BufferedReader(CommandOutput(command, url, timeout_s), buffer_size=1 << 16)


class CommandOutput(io.RawIOBase):
    """A command's stdout as a file, with a no-output timeout and its stderr in errors."""

    def __init__(self, command: str, url: str, timeout_s: float) -> None:
        self.command, self.url, self.timeout_s = command, url, timeout_s
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (a file, so it never fills up)
        self.process = subprocess.Popen(
            command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        fd = self.process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout_s)
        if not ready:
            self.stop()
            raise TimeoutError(
                f"no data for {self.timeout_s:g} s from `{self.command}` "
                f"(data.source_timeout_s){self.stderr_tail()}"
            )
        data = os.read(fd, len(buffer))
        buffer[: len(data)] = data
        if not data and self.process.wait() != 0:
            raise OSError(
                f"`{self.command}` exited with status {self.process.returncode}{self.stderr_tail()}"
            )
        return len(data)

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        text = self.stderr.read()[-2000:].decode(errors="replace").strip()
        return f"; stderr: {text}" if text else ""

    def stop(self) -> None:
        """Kill the command and what it started (a shell script's own children)."""
        if self.process.poll() is not None:
            return
        try:
            tree = [*psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.Error:
            tree = []
        for process in [*tree, self.process]:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                process.kill()
        self.process.wait()

    def close(self) -> None:
        if not self.closed:
            self.stop()
            self.process.stdout.close()
            self.stderr.close()
        super().close()
