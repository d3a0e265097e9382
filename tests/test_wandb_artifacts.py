"""W&B artifacts and linked runs, read back from offline runs: checkpoints logged with their
config by ``logger.wandb.log_model``, evaluation and export runs joining the training run."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import OmegaConf, open_dict
from PIL import Image
from wandb.proto import wandb_internal_pb2

from pbe_lightning.demo.dataset import demo_scene
from pbe_lightning.demo.tiny_models import tiny_clip_folder
from pbe_lightning.evaluate import evaluate
from pbe_lightning.export import main as export_main
from pbe_lightning.models.build import load_trained
from pbe_lightning.safe_load import UnsafeCheckpoint
from pbe_lightning.train import train
from pbe_lightning.utils.loggers import (
    TrainingRun,
    WandbLogger,
    join_training_run,
    use_checkpoint_artifact,
)
from tests.helpers.config import CONF, compose_config
from tests.helpers.payloads import with_payload

STEPS = 4  # debug=tiny: checkpoints at steps 2 and 4 (and last.ckpt at 4)


# -- reading an offline run ----------------------------------------------------------------------
def read_transaction_log(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of an offline run's ``run-<id>.wandb`` transaction log, as far as written.

    wandb 0.31 ships no Python reader (``wandb leet inspect --json`` prints them). The format
    is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
    chunks, each ``<crc32 u32><length u16><type u8>`` + data; type 1 is a whole record, 2/3/4
    its first/middle/last piece. Each record is a protobuf ``Record``.
    """
    data = path.read_bytes()
    if data[:4] != b":W&B":
        return []  # not written yet
    block, header = 32768, 7
    records, pieces, position = [], [], header
    while position + header <= len(data):
        left = block - position % block
        if left < header:  # the block's zero-padded tail
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + header])
        piece = data[position + header : position + header + length]
        if len(piece) < length:
            break  # a chunk still being written
        position += header + length
        if kind == 0:  # padding
            continue
        pieces = [piece] if kind in (1, 2) else [*pieces, piece]
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
    return records


def wandb_records(run_dir: Path, timeout_s: float = 60) -> list[wandb_internal_pb2.Record]:
    """A finished offline run's records. ``finish()`` returns before W&B's writer process has
    flushed the log, so this waits for the run's ``exit`` record."""
    path = next(run_dir.glob("run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_transaction_log(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.1)


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def offline_run(folder: Path) -> Path:
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def config_items(records: list) -> dict:
    """The run's config as logged (the run record's and later updates), JSON-decoded."""
    items = [i for run in of_type(records, "run") for i in run.config.update]
    items += [i for config in of_type(records, "config") for i in config.update]
    return {item.key: json.loads(item.value_json) for item in items}


def history(records: list) -> list[dict]:
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
        for h in of_type(records, "history")
    ]


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def wandb_data_dir(tmp_path_factory):
    """W&B stages an offline run's artifact files under ``$WANDB_DATA_DIR``: keep them here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DATA_DIR", str(tmp_path_factory.mktemp("wandb-data")))
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """A tiny training run (4 steps) with W&B offline and ``log_model=all``: its run folder."""
    root = tmp_path_factory.mktemp("wandb-train") / "run"
    overrides = ["logger=wandb", "logger.wandb.offline=true", "logger.wandb.log_model=all"]
    overrides += ["+trainer.limit_val_batches=0", "~callbacks.sample_images"]
    train(compose_config(root, cache_dir, *overrides))
    return root


@pytest.fixture(scope="module")
def run_id(trained) -> str:
    return (trained / "wandb_run_id").read_text().strip()


def build_benchmark(root: Path, items: int = 3) -> tuple[Path, Path]:
    """A minimal benchmark folder (manifest, source/mask/reference) and a real-images folder."""
    bench, real = root / "bench", root / "real"
    for sub in ("source", "mask", "reference"):
        (bench / sub).mkdir(parents=True)
    real.mkdir()
    entries = []
    for i in range(items):
        scene = demo_scene(np.random.default_rng([5, i]), 72)[0].resize((80, 64))
        scene.save(bench / "source" / f"{i}.png")
        mask = np.zeros((64, 80), np.uint8)
        mask[16:48, 20:56] = 255
        Image.fromarray(mask).save(bench / "mask" / f"{i}.png")
        scene.crop((20, 16, 56, 48)).save(bench / "reference" / f"{i}.png")
        entries.append({"id": str(i), "category": "shape"})
        entries[-1] |= {k: f"{k}/{i}.png" for k in ("source", "mask", "reference")}
    (bench / "manifest.json").write_text(json.dumps({"items": entries}))
    for i in range(4):
        demo_scene(np.random.default_rng([6, i]), 72)[0].save(real / f"{i}.png")
    return bench, real


def eval_config(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


# -- checkpoints as artifacts --------------------------------------------------------------------
def test_lightnings_own_log_model_refuses_offline_and_ours_does_not(tmp_path):
    # The reason for our subclass (lightning 2.6); if this starts passing, Lightning's may do.
    with pytest.raises(MisconfigurationException, match="offline"):
        LightningWandbLogger(save_dir=tmp_path, offline=True, log_model="all")
    WandbLogger(save_dir=tmp_path, offline=True, log_model="all")
    with pytest.raises(ValueError, match="log_model"):
        WandbLogger(save_dir=tmp_path, offline=True, log_model="sometimes")


def test_log_model_all_logs_one_reloadable_artifact_per_checkpoint_step(trained, run_id, tmp_path):
    records = wandb_records(offline_run(trained))
    (run,) = of_type(records, "run")
    assert (run.run_group, run.job_type) == ("run/run", "train")  # a single run's own group
    artifacts = of_type(records, "artifact")
    # last.ckpt at step 4 is the step_0000004.ckpt model: one version per step.
    assert [(a.name, a.type) for a in artifacts] == [(f"model-{run_id}", "model")] * 2
    assert [set(a.aliases) - {"best"} for a in artifacts] == [
        {"latest", f"step-{step}"} for step in (2, STEPS)
    ]
    last = artifacts[-1]
    files = {entry.path: Path(entry.local_path) for entry in last.manifest.contents}
    assert set(files) == {"model.ckpt", "config_resolved.yaml"}
    metadata = json.loads(last.metadata)
    assert metadata["global_step"] == STEPS
    assert metadata["frozen_weights"]["backbone"]["_target_"].endswith("tiny_backbone")

    # The staged files are what `wandb sync` uploads: as a download would lay them out, they
    # reload alone (the frozen weights from the paths in the checkpoint's model config) and
    # still name their training run.
    download = tmp_path / f"model-{run_id}-v1"
    download.mkdir()
    for name, staged in files.items():
        (download / name).write_bytes(staged.read_bytes())
    config = OmegaConf.load(download / "config_resolved.yaml")
    assert (config.logger.wandb.id, config.logger.wandb.log_model) == (run_id, "all")
    module = load_trained(str(download / "model.ckpt"))
    original = load_trained(str(trained / "checkpoints" / "last.ckpt"))
    assert torch.equal(module.unet.conv_in.weight, original.unet.conv_in.weight)
    linked = TrainingRun.of(download / "model.ckpt")
    assert (linked.run_id, linked.group, linked.artifact) == (
        run_id,
        "run/run",
        f"model-{run_id}:step-{STEPS}",
    )


def test_a_tampered_artifact_checkpoint_is_refused_before_it_runs(trained, run_id, tmp_path):
    # A shared artifact someone re-uploaded with a pickle payload added to model.ckpt.
    records = wandb_records(offline_run(trained))
    last = of_type(records, "artifact")[-1]
    files = {entry.path: Path(entry.local_path) for entry in last.manifest.contents}
    download, marker = tmp_path / f"model-{run_id}-v1", tmp_path / "payload-ran"
    download.mkdir()
    (download / "config_resolved.yaml").write_bytes(files["config_resolved.yaml"].read_bytes())
    with_payload(files["model.ckpt"], download / "model.ckpt", marker)
    with pytest.raises(UnsafeCheckpoint, match=r"refused to load .*model\.ckpt: it holds a "):
        TrainingRun.of(download / "model.ckpt")  # eval and export runs name their run first
    with pytest.raises(UnsafeCheckpoint):
        load_trained(str(download / "model.ckpt"))
    with pytest.raises(SystemExit, match="^error: refused to load "):
        export_main(["--ckpt", str(download / "model.ckpt"), "--out", str(tmp_path / "p")])
    assert not marker.exists()


def test_log_model_true_logs_the_kept_checkpoints_when_training_ends(tmp_path, cache_dir):
    overrides = ["logger=wandb", "logger.wandb.offline=true", "logger.wandb.log_model=true"]
    overrides += ["+trainer.limit_val_batches=0", "~callbacks.sample_images"]
    overrides += ["callbacks.checkpoint.save_top_k=1"]
    train(compose_config(tmp_path / "run", cache_dir, *overrides))
    artifacts = of_type(wandb_records(offline_run(tmp_path / "run")), "artifact")
    assert [set(a.aliases) for a in artifacts] == [{"latest", "best", f"step-{STEPS}"}]


# -- evaluation and export runs join the training run ------------------------------------------
def test_an_eval_run_joins_its_training_run_at_the_checkpoints_step(
    trained, run_id, tmp_path, cache_dir
):
    bench, real = build_benchmark(tmp_path)
    out = tmp_path / "eval"
    cfg = eval_config(
        out,
        f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
        f"benchmark={bench}",
        f"real_images={real}",
        f"clip.arch=local-dir:{tiny_clip_folder(cache_dir)}",
        "steps=1",
        "batch_size=2",
        "logger=wandb",
    )
    report = evaluate(cfg)
    records = wandb_records(offline_run(out))
    (run,) = of_type(records, "run")
    assert run.run_group == "run/run" and run.job_type == "eval"
    assert run.display_name == f"eval/run@step-{STEPS}"  # the training run's folder, its step
    assert run.project == "pbe-lightning"
    checkpoint = config_items(records)["checkpoint"]
    # Offline, W&B cannot `use_artifact`: the artifact's name and the path are in the config.
    assert checkpoint["artifact"] == f"model-{run_id}:step-{STEPS}"
    assert checkpoint["artifact_used"] is False
    assert checkpoint["path"] == str((trained / "checkpoints" / "last.ckpt").resolve())
    assert checkpoint["training_run"]["id"] == run_id
    rows = [row for row in history(records) if "eval/clip_score" in row]
    assert len(rows) == 1 and rows[0]["trainer/global_step"] == STEPS
    assert rows[0]["eval/clip_score"] == pytest.approx(report["metrics"]["clip_score"])


def test_export_logs_the_pipeline_as_a_model_artifact_in_the_training_group(
    trained, run_id, tmp_path, capsys
):
    ckpt = trained / "checkpoints" / "last.ckpt"
    export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "pipe"), "--wandb-artifact"])
    assert f"pipeline-{run_id}" in capsys.readouterr().out
    records = wandb_records(offline_run(tmp_path))  # beside the export, not inside it
    (run,) = of_type(records, "run")
    assert (run.run_group, run.job_type) == ("run/run", "export")
    assert run.display_name == f"export/run@step-{STEPS}"
    (artifact,) = of_type(records, "artifact")
    assert (artifact.name, artifact.type) == (f"pipeline-{run_id}", "model")
    assert set(artifact.aliases) == {"latest", f"step-{STEPS}"}
    paths = {entry.path for entry in artifact.manifest.contents}
    assert {"model_index.json", "unet/config.json", "vae/config.json"} <= paths
    assert not any(path.startswith("wandb/") for path in paths)
    metadata = json.loads(artifact.metadata)
    assert metadata["checkpoint_artifact"] == f"model-{run_id}:step-{STEPS}"

    # The official single file, under a name of one's own.
    out = tmp_path / "official" / "model.safetensors"
    export_main(["--ckpt", str(ckpt), "--format", "official", "--out", str(out)])
    export_main(
        ["--ckpt", str(ckpt), "--format", "official", "--out", str(out), "--wandb-artifact", "mine"]
    )
    (artifact,) = of_type(wandb_records(offline_run(out.parent)), "artifact")
    assert artifact.name == "mine"
    assert [entry.path for entry in artifact.manifest.contents] == ["model.safetensors"]


def test_a_checkpoint_without_artifacts_names_its_path_and_its_run_folder(
    tiny_checkpoint, tmp_path
):
    # The session checkpoint was trained with CSV logs only: no W&B run, no artifact.
    run = TrainingRun.of(tiny_checkpoint)
    assert (run.global_step, run.artifact, run.label) == (1, None, "run")
    assert run.describe()["path"] == str(tiny_checkpoint.resolve())
    cfg = eval_config(tmp_path, f"ckpt_path={tiny_checkpoint}", "logger=wandb")
    join_training_run(cfg, "eval")
    wandb = cfg.logger.wandb
    assert (wandb.name, wandb.group, wandb.project, wandb.job_type) == (
        "eval/run@step-1",
        "run",
        "pbe-lightning",
        "eval",
    )
    # What the command line sets is kept.
    overrides = [f"ckpt_path={tiny_checkpoint}", "logger=wandb", "logger.wandb.name=mine"]
    cfg = eval_config(tmp_path, *overrides)
    join_training_run(cfg, "eval")
    assert cfg.logger.wandb.name == "mine"


class FakeRun:
    """A W&B run's ``use_artifact`` as seen online: records what is used, or fails."""

    def __init__(self, offline: bool, error: Exception | None = None) -> None:
        self.offline, self.error, self.used = offline, error, []

    def use_artifact(self, reference: str, type: str) -> None:
        if self.error:
            raise self.error
        self.used.append((reference, type))


def test_online_runs_use_the_checkpoints_artifact_and_survive_a_missing_one(trained, run_id):
    run = TrainingRun.of(trained / "checkpoints" / "last.ckpt")
    online = FakeRun(offline=False)
    assert use_checkpoint_artifact(online, run)
    assert online.used == [(f"pbe-lightning/model-{run_id}:step-{STEPS}", "model")]
    assert not use_checkpoint_artifact(FakeRun(offline=True), run)
    assert not use_checkpoint_artifact(FakeRun(False, RuntimeError("not synced yet")), run)
