"""What the README promises about itself and the checkout."""

from __future__ import annotations

import re
import subprocess

from tests.helpers.config import REPO

README = (REPO / "README.md").read_text()


def test_the_suite_duration_is_stated_once():
    durations = re.findall(r"\d+ minutes on 2 cores", README)
    assert len(durations) == 1, durations


def test_run_folders_the_readme_writes_to_are_ignored_by_git():
    folders = {"outputs", "multirun"} | set(re.findall(r"hydra\.run\.dir=(\w+)/", README))
    assert "runs" in folders  # the README's own example for a user's data
    for folder in folders:
        probe = f"{folder}/some-run/checkpoints/last.ckpt"
        ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO)
        assert ignored.returncode == 0, f"{folder}/ is not git-ignored"
