"""Export to diffusers' PaintByExamplePipeline: stock classes must compute what our module does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import PNDMScheduler
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from pbe_lightning.convert.pipeline import load_pipeline
from pbe_lightning.export import export_official, export_pipeline, main
from pbe_lightning.models.build import build_model
from pbe_lightning.models.samplers import make_sampler
from tests.helpers.config import REPO, compose_config

STEPS = 3


@pytest.fixture(scope="module")
def module(tmp_path_factory, cache_dir):
    model = build_model(compose_config(tmp_path_factory.mktemp("run"), cache_dir).model).eval()
    # Zero-initialised parts (the UNet's 5 new input channels) would hide a wrong channel order.
    torch.manual_seed(0)
    with torch.no_grad():
        model.unet.conv_in.weight[:, 4:].add_(
            0.1 * torch.randn_like(model.unet.conv_in.weight[:, 4:])
        )
        for param in model.encoder.trainable_parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def exported(module, tmp_path_factory) -> Path:
    return export_pipeline(module, tmp_path_factory.mktemp("export") / "pipe")


@pytest.fixture(scope="module")
def batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    mask = torch.ones(2, 1, 64, 64)
    mask[0, :, 16:48, 8:40] = 0  # 0 = paint here
    mask[1, :, 0:24, 24:64] = 0
    reference = torch.rand(2, 3, 32, 32, generator=generator)
    return dict(image=image, mask=mask, masked_image=image * mask, reference=reference)


def smooth_image(side: int) -> np.ndarray:
    """A photo-like uint8 image: bicubic overshoot stays inside [0, 255], so nothing clips."""
    y, x = np.mgrid[0:side, 0:side] / side
    channels = [np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)]
    return (128 + 80 * np.stack(channels, axis=-1)).round().astype(np.uint8)


def clip_pixels(module, reference: torch.Tensor) -> torch.Tensor:
    return (reference - module.encoder.mean) / module.encoder.std


def test_folder_is_a_stock_pipeline(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "PaintByExamplePipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    unet = json.loads((exported / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 9
    scheduler = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["skip_prk_steps"]
    encoder = json.loads((exported / "image_encoder" / "config.json").read_text())
    assert encoder["hidden_act"] == "quick_gelu"  # the tiny CLIP is QuickGELU, like OpenAI's
    # The official release's names, which transformers 4 and 5 both load.
    keys = load_file(exported / "image_encoder" / "model.safetensors")
    assert "model.vision_model.embeddings.patch_embedding.weight" in keys


def test_image_encoder_matches_ours(module, exported, batch):
    pipe = load_pipeline(exported)
    pixels = clip_pixels(module, batch["reference"])
    with torch.no_grad():
        theirs, uncond = pipe.image_encoder(pixels, return_uncond_vector=True)
        ours = module.encoder(batch["reference"])
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert torch.equal(uncond, module.encoder.uncond_vector)
    # PIL exemplars go through the exported CLIPImageProcessor: the same squash-resize + norm.
    for side in (32, 48):
        array = smooth_image(side)
        reference = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
        if side != 32:
            reference = F.interpolate(reference, (32, 32), mode="bicubic", antialias=True)
        processed = pipe.feature_extractor(images=Image.fromarray(array), return_tensors="pt")
        # Resized, the processor rounds to uint8 before normalising: allow two levels.
        atol = 1e-5 if side == 32 else 2 / 255 / module.encoder.std.min().item()
        torch.testing.assert_close(
            processed.pixel_values, clip_pixels(module, reference), atol=atol, rtol=0
        )


@pytest.mark.parametrize("sampler", ["ddim", "pndm"])
def test_stock_pipeline_paints_what_we_paint(module, exported, batch, sampler):
    pipe = load_pipeline(exported)
    if sampler == "ddim":
        pipe.scheduler = make_sampler("ddim", module.noise_scheduler)
    else:  # the scheduler as shipped
        assert isinstance(pipe.scheduler, PNDMScheduler)
    ours = module.paint(batch, STEPS, 5.0, sampler, generator=torch.Generator().manual_seed(7))
    theirs = pipe(
        example_image=clip_pixels(module, batch["reference"]),
        image=batch["image"],
        mask_image=1 - batch["mask"],  # the pipeline repaints white and inverts
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images
    assert ours.std() > 0.1  # not a constant image that anything would match
    torch.testing.assert_close(theirs * 2 - 1, ours, atol=1e-4, rtol=0)


def test_exports_ema_weights_without_touching_the_module(module, tmp_path):
    trainable = {id(p) for p in module.trainable_parameters()}
    ema = {n: p.detach() + 0.5 for n, p in module.named_parameters() if id(p) in trainable}
    before = module.unet.conv_in.weight.clone()
    out = export_pipeline(module, tmp_path / "ema", ema=True, checkpoint={"pbe_ema": ema})
    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    encoder = load_file(out / "image_encoder" / "model.safetensors")
    assert torch.equal(unet["conv_in.weight"], ema["unet.conv_in.weight"])
    assert torch.equal(encoder["proj_out.weight"], ema["encoder.proj_out.weight"])
    assert torch.equal(module.unet.conv_in.weight, before)
    with pytest.raises(ValueError, match="no 'pbe_ema'"):
        export_pipeline(module, tmp_path / "none", ema=True, checkpoint={})
    del ema["unet.conv_in.bias"]
    with pytest.raises(ValueError, match="lack EMA weights"):
        export_pipeline(module, tmp_path / "half", ema=True, checkpoint={"pbe_ema": ema})


def test_refuses_what_diffusers_cannot_load(module, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(module.encoder, "bottleneck", "tokens")
        with pytest.raises(ValueError, match="bottleneck=cls"):
            export_pipeline(module, tmp_path / "tokens")
    blocks = module.encoder.mapper.blocks
    monkeypatch.setattr(module.encoder.mapper, "blocks", nn.ModuleList([*blocks, *blocks]))
    with pytest.raises(ValueError, match="mapper_depth=1"):
        export_pipeline(module, tmp_path / "depth")


def test_official_format_writes_ema_weights_and_refuses_what_it_cannot_hold(
    module, tmp_path, monkeypatch
):
    trainable = {id(p) for p in module.trainable_parameters()}
    ema = {n: p.detach() + 0.5 for n, p in module.named_parameters() if id(p) in trainable}
    before = module.unet.conv_in.weight.clone()
    out = export_official(
        module, tmp_path / "ema.safetensors", ema=True, checkpoint={"pbe_ema": ema}
    )
    state = load_file(out)
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(state[unet_in], ema["unet.conv_in.weight"])
    assert torch.equal(state["proj_out.weight"], ema["encoder.proj_out.weight"])
    assert torch.equal(state["learnable_vector"], ema["encoder.uncond_vector"])
    assert torch.equal(module.unet.conv_in.weight, before)
    plain = load_file(export_official(module, tmp_path / "plain.safetensors"))
    assert torch.equal(plain[unet_in], before)
    with pytest.raises(ValueError, match="no 'pbe_ema'"):
        export_official(module, tmp_path / "none.safetensors", ema=True, checkpoint={})
    with pytest.raises(ValueError, match=r"\.safetensors.*--out model\.safetensors"):
        export_official(module, tmp_path / "folder")
    monkeypatch.setattr(module.encoder, "bottleneck", "tokens")
    with pytest.raises(ValueError, match="bottleneck='tokens' in the official layout.*Keep"):
        export_official(module, tmp_path / "tokens.safetensors")
    assert not (tmp_path / "tokens.safetensors").exists()


def test_cli_exports_a_trained_checkpoint(tmp_path, cache_dir, tiny_checkpoint):
    ckpt = tiny_checkpoint
    env = dict(os.environ, PBE_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "pbe_lightning.export", "--ckpt", str(ckpt)]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "pipe")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    pipe = load_pipeline(tmp_path / "pipe")
    trained = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(pipe.unet.conv_in.weight, trained["unet.conv_in.weight"])
    assert torch.equal(pipe.image_encoder.proj_out.weight, trained["encoder.proj_out.weight"])
    with pytest.raises(SystemExit, match="^error: the checkpoint has no 'pbe_ema' entry") as info:
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "ema"), "--ema"])  # one line
    assert "\n" not in str(info.value) and not (tmp_path / "ema").exists()


def test_cli_lists_every_argument_mistake_at_once(tmp_path):
    args = ["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x.bin")]
    with pytest.raises(SystemExit) as info:
        main([*args, "--format", "official"])
    assert str(info.value).splitlines() == [
        f"error: --ckpt {tmp_path}/nope.ckpt: no such file",
        f"error: --out {tmp_path}/x.bin: --format official writes one file, name it "
        "*.safetensors (the tensors) or *.ckpt (a state_dict, for the official repository's "
        "scripts)",
    ]
