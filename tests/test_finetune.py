"""experiment=finetune: start from trained Paint-by-Example weights, official file or pipeline."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion import convert_from_ckpt
from safetensors.torch import load_file, save_file

from pbe_lightning.convert.clip import clip_vision_config
from pbe_lightning.convert.ldm import unet_to_ldm, vae_to_ldm
from pbe_lightning.convert.official import to_official_layout
from pbe_lightning.convert.pipeline import load_pipeline
from pbe_lightning.demo.tiny_models import tiny_sd_folder
from pbe_lightning.export import export_pipeline, main
from pbe_lightning.models.build import build_model, load_trained
from pbe_lightning.models.init_from import init_weights
from pbe_lightning.safe_load import UnsafeCheckpoint, trusted_files
from pbe_lightning.train import train
from tests.helpers.config import compose_config
from tests.helpers.payloads import with_payload


class InitProbe(L.Callback):
    """Saves the weights training starts from (the callback runs inside ``train``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        torch.save({k: v.clone() for k, v in pl_module.state_dict().items()}, self.path)


def finetune_cfg(tiny_cfg, init_from, *overrides: str):
    return tiny_cfg(
        "experiment=finetune",
        f"model.init_from={init_from}",
        # Tiny architecture (the tiny backbone takes no path), demo data, CPU.
        "model/encoder=tiny",
        "model/backbone=tiny",
        "~model.backbone.path",
        "data=demo",
        "data.resolution=64",
        "data.reference_size=64",
        "trainer=cpu",
        "metrics_clip.arch=local-dir:${paths.cache_dir}/tiny/clip",  # the paper's metrics, tiny
        *overrides,
    )


def assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@pytest.fixture(scope="module")
def original(tmp_path_factory, cache_dir):
    """A 'trained' module: every weight, frozen ones too, moved off what a fresh build has."""
    model = build_model(compose_config(tmp_path_factory.mktemp("run"), cache_dir).model).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def official_file(original, tmp_path_factory) -> Path:
    state = to_official_layout(original.unet, original.vae, original.encoder)
    # What the real file also holds: LDM's schedule buffers, transformers 4's position ids.
    state["betas"] = torch.linspace(0.1, 0.2, 10)
    state["cond_stage_model.transformer.vision_model.embeddings.position_ids"] = torch.arange(17)
    path = tmp_path_factory.mktemp("official") / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path)
    return path


@pytest.fixture(scope="module")
def pipeline_folder(original, tmp_path_factory) -> Path:
    return export_pipeline(original, tmp_path_factory.mktemp("export") / "pipe")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, cache_dir):
    return build_model(compose_config(tmp_path_factory.mktemp("run"), cache_dir).model)


def test_official_file_imports_exactly_and_exports_the_same_pipeline(
    original, official_file, pipeline_folder, tiny_cfg, tmp_path
):
    imported = build_model(finetune_cfg(tiny_cfg, official_file).model).eval()
    assert_same_state(imported.state_dict(), original.state_dict())
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        example_image=torch.rand(1, 3, 32, 32, generator=generator),
        image=torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1,
        mask_image=(torch.rand(1, 1, 64, 64, generator=generator) > 0.5).float(),
        num_inference_steps=2,
        output_type="pt",
    )
    painted = [
        load_pipeline(folder)(**inputs, generator=torch.Generator().manual_seed(7)).images
        for folder in (pipeline_folder, export_pipeline(imported, tmp_path / "again"))
    ]
    assert painted[0].std() > 0.05 and torch.equal(*painted)


def test_pipeline_folder_imports_exactly(original, pipeline_folder, tiny_cfg):
    imported = build_model(finetune_cfg(tiny_cfg, pipeline_folder).model)
    assert_same_state(imported.state_dict(), original.state_dict())


def test_official_format_export_of_a_trained_checkpoint_is_what_finetune_starts_from(
    tiny_checkpoint, tiny_cfg, tmp_path
):
    """python -m pbe_lightning.export --format official, read back by model.init_from."""
    trained = load_trained(str(tiny_checkpoint))
    saved = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    for name in ("model.safetensors", "model.ckpt"):
        out = tmp_path / name
        main(["--ckpt", str(tiny_checkpoint), "--format", "official", "--out", str(out)])
        imported = build_model(finetune_cfg(tiny_cfg, out).model)
        assert_same_state(imported.state_dict(), trained.state_dict())
        assert torch.equal(imported.unet.conv_in.weight, saved["unet.conv_in.weight"])
        assert torch.equal(imported.encoder.proj_out.weight, saved["encoder.proj_out.weight"])
    # .ckpt: {"state_dict": ...}, what the official repository's scripts torch.load.
    official = torch.load(tmp_path / "model.ckpt", weights_only=True)["state_dict"]
    assert_same_state(load_file(tmp_path / "model.safetensors"), official)
    assert "learnable_vector" in official
    assert "model.diffusion_model.input_blocks.0.0.weight" in official
    assert "cond_stage_model.transformer.vision_model.embeddings.class_embedding" in official
    with pytest.raises(SystemExit):  # a file name without --format official
        main(["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "pipe.safetensors")])


def test_official_layout_is_what_diffusers_own_converter_reads(original, monkeypatch):
    """An independent reader of the official names: diffusers' converter for that file."""
    config = clip_vision_config(original.encoder)
    stub = SimpleNamespace(from_pretrained=lambda *args, **kwargs: config)
    monkeypatch.setattr(convert_from_ckpt, "CLIPVisionConfig", stub)  # it would download
    state = to_official_layout(original.unet, original.vae, original.encoder)
    flat = not hasattr(convert_from_ckpt.PaintByExampleImageEncoder(config).model, "vision_model")
    if flat:  # transformers 5's CLIPVisionModel has no vision_model level; the file does
        state = {
            k.replace("transformer.vision_model.", "transformer."): v for k, v in state.items()
        }
    theirs = convert_from_ckpt.convert_paint_by_example_checkpoint(state).eval()
    reference = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pixels = (reference - original.encoder.mean) / original.encoder.std
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixels), original.encoder(reference), atol=1e-4, rtol=0)
    assert torch.equal(theirs.uncond_vector, original.encoder.uncond_vector)


def test_finetune_trains_from_the_imported_weights(original, official_file, tiny_cfg, tmp_path):
    start = tmp_path / "start.pt"
    cfg = finetune_cfg(
        tiny_cfg,
        official_file,
        "trainer.max_steps=2",
        "logger=none",
        "model.optimizer.lr=1e-3",  # big enough that two steps visibly move the weights
        "+callbacks.init_probe._target_=tests.test_finetune.InitProbe",
        f"+callbacks.init_probe.path={start}",
    )
    assert cfg.model.lr_scheduler.warmup_steps == 1000
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    assert_same_state(torch.load(start, weights_only=True), original.state_dict())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
    # Frozen weights are not in checkpoints: they come back from model.init_from.
    resumed = load_trained(str(ckpt))
    assert torch.equal(resumed.vae.decoder.conv_out.weight, original.vae.decoder.conv_out.weight)
    assert torch.equal(resumed.encoder.vision.conv1.weight, original.encoder.vision.conv1.weight)
    assert not torch.equal(resumed.unet.conv_in.weight, original.unet.conv_in.weight)


def test_finetune_experiment_is_the_paper_recipe_from_trained_weights(tiny_cfg):
    cfg = tiny_cfg("experiment=finetune", "model.init_from=/w/pbe.ckpt")
    model = cfg.model
    assert model.optimizer.lr == 1e-5 and model.lr_scheduler.warmup_steps == 1000
    assert model.backbone.path == "/w/pbe.ckpt"  # the architecture source, then overwritten
    assert model.encoder.arch == "ViT-L-14-quickgelu" and model.encoder.mapper_depth == 5
    assert cfg.data.resolution == 512 and cfg.trainer.strategy == "ddp"


def test_unset_or_wrong_weights_are_named(official_file, fresh, tiny_cfg, tmp_path, cache_dir):
    with pytest.raises(ValueError, match="experiment=finetune needs .* model.init_from="):
        build_model(tiny_cfg("experiment=finetune").model)
    # Before the backbone (built from the same path) can blame model.backbone.path.
    nope = tmp_path / "nope.ckpt"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"no weights at {nope} (model.init_from)")
    ):
        build_model(tiny_cfg("experiment=finetune", f"model.init_from={nope}").model)
    with pytest.raises(FileNotFoundError, match="not a PaintByExamplePipeline folder"):
        init_weights(fresh, tiny_sd_folder(cache_dir))
    sd_only = {
        **unet_to_ldm(fresh.unet.state_dict(), fresh.unet.config),
        **vae_to_ldm(fresh.vae.state_dict(), fresh.vae.config),
    }
    save_file({k: v.contiguous() for k, v in sd_only.items()}, tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match=r"cond_stage_model.transformer.\*.*model.backbone.path"):
        init_weights(fresh, tmp_path / "sd.safetensors")
    state = torch.load(official_file, weights_only=True)["state_dict"]
    del state["proj_out.bias"]
    state["learnable_vector"] = torch.zeros(1, 1, 16)
    torch.save(state, tmp_path / "bad.ckpt")
    before = fresh.encoder.proj_out.weight.clone()
    with pytest.raises(ValueError, match=r"1 missing \['encoder.proj_out.bias'\]") as info:
        init_weights(fresh, tmp_path / "bad.ckpt")
    assert "encoder.uncond_vector (1, 1, 16) in the file, (1, 1, 32) in the model" in str(
        info.value
    )
    assert torch.equal(fresh.encoder.proj_out.weight, before)  # checked before anything loads


def test_init_weights_holding_code_are_refused_unless_trusted(official_file, tiny_cfg, tmp_path):
    marker = tmp_path / "payload-ran"
    tampered = with_payload(official_file, tmp_path / "model.ckpt", marker)
    with pytest.raises(UnsafeCheckpoint, match=r"model\.ckpt: it holds .*\(model\.init_from\)"):
        build_model(finetune_cfg(tiny_cfg, tampered).model)
    assert not marker.exists()
    with trusted_files(tampered):  # trust_checkpoint=true: the user's call, and its code runs
        build_model(finetune_cfg(tiny_cfg, tampered).model)
    assert marker.exists()
