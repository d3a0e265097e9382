"""When the product stops a run on purpose it says why in one ``error:`` line and exits 1; a
traceback is kept for bugs (and for ``HYDRA_FULL_ERROR=1``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.config import TINY
from tests.helpers.hostile_corpus import good_jpeg_record, meta, tar_bytes
from tests.helpers.processes import run_train


def half_broken_shards(folder: Path, shards: int = 4, per_shard: int = 8) -> str:
    """Every other record has no usable box (reversed corners): half the data is unusable."""
    folder.mkdir(parents=True)
    for shard in range(shards):
        records = []
        for i in range(per_shard):
            record = good_jpeg_record()
            if i % 2:
                record["json"] = meta(boxes=[[90, 90, 10, 10]])
            records.append((f"s{shard}_{i}", record))
        (folder / f"half-{shard:03d}.tar").write_bytes(tar_bytes(records))
    return f"data.shards='{folder}/half-{{000..{shards - 1:03d}}}.tar'"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_the_data_health_stop_is_one_line_and_a_full_error_keeps_its_traceback(
    tmp_path, cache_dir, timeout=900
):
    args = [*TINY, "data=webdataset", half_broken_shards(tmp_path / "shards")]
    args += ["callbacks.data_health.min_records=4", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_train(args, tmp_path, cache_dir, timeout=900)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: ") and " records were unusable " in line, line
    assert "callbacks.data_health.max_skip_fraction=0.05: the data is broken" in line

    debugging = run_train(args, tmp_path, cache_dir, timeout=900, HYDRA_FULL_ERROR="1")
    assert debugging.returncode == 1
    assert "Traceback" in debugging.stderr and "DataBroken" in debugging.stderr
