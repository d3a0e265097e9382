"""Shards from anywhere: served over HTTP, from commands that fail or hang, unknown schemes."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from itertools import islice

import pytest
import torch

from pbe_lightning.data.datamodule import check_local_shards, expand_urls
from pbe_lightning.data.samples import SampleSpec
from pbe_lightning.data.stream import TrainStream
from pbe_lightning.demo.dataset import demo_shard_pattern, ensure_demo_dataset

SPEC = SampleSpec(resolution=64, reference_size=32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("shards")
    ensure_demo_dataset(root, samples=24, per_shard=6, size=64)
    return expand_urls(demo_shard_pattern(root, 4))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # not on the test's output
        pass


@pytest.fixture(scope="module")
def server(shards: list[str]):
    """The shards' folder served on 127.0.0.1, as an object store's HTTPS endpoint would be."""
    folder = shards[0].rsplit("/", 1)[0]
    handler = functools.partial(QuietHandler, directory=folder)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def batches(urls: list[str], count: int, **options) -> list[dict]:
    stream = TrainStream(urls, SPEC, batch_size=3, seed=4, shuffle_buffer=4, **options)
    return list(islice(iter(stream), count))


@pytest.mark.skipif(shutil.which("curl") is None, reason="http(s):// shards are read with curl")
def test_served_and_local_shards_give_the_same_samples(shards, server):
    served = [f"{server}/{url.rsplit('/', 1)[1]}" for url in shards]
    mixed = [served[0], shards[1], served[2], shards[3]]
    local, remote = batches(shards, 6), batches(mixed, 6)
    for a, b in zip(local, remote):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["reference"], b["reference"])
    missing = f"{server}/no-such-shard.tar"
    with (
        pytest.warns(UserWarning, match="no-such-shard.tar.*exited with status 22.*404"),
        pytest.raises(RuntimeError, match="no-such-shard.tar"),  # no source left: it stops
    ):
        batches([missing], 1)


def test_a_command_that_hangs_is_abandoned_after_the_timeout(tmp_path):
    with (
        pytest.warns(UserWarning, match="no data for 1 s from `sleep 600`"),
        pytest.raises(RuntimeError, match="corrupt, unreadable or empty.*no data for 1 s"),
    ):
        batches(["pipe:sleep 600"], 1, source_timeout_s=1)


def test_a_command_that_fails_is_reported_once_with_its_stderr(shards):
    failing = "pipe:echo 'Unable to locate credentials' >&2; exit 3"
    with pytest.warns(UserWarning) as caught:
        got = batches([failing, *shards], 16, sampling="epochs")  # two passes: read twice
    assert len(got) == 16  # the other shards carry training
    about_it = [str(w.message) for w in caught if "Unable to locate credentials" in str(w.message)]
    assert len(about_it) == 1 and "exited with status 3" in about_it[0]


def test_a_scheme_nothing_reads_is_refused_before_training(shards):
    with pytest.raises(ValueError, match="data.shards: no way to read ftp:// URLs.*pipe:"):
        check_local_shards(["ftp://host/train-0.tar", *shards], "data.shards")
