"""Backbone loading and the widened UNet, on tiny models saved in the real formats (the
exemplar encoder's families: tests/test_encoders.py)."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from pbe_lightning.convert.ldm import unet_to_ldm, vae_to_ldm
from pbe_lightning.demo.tiny_models import (
    TINY_UNET,
    tiny_backbone,
    tiny_clip_folder,
    tiny_exemplar_encoder,
    tiny_sd_folder,
)
from pbe_lightning.models.backbone import load_backbone, widen_input


def test_cls_bottleneck_is_clips_pooled_token_before_projection(cache_dir):
    # The paper's recipe (docs/paper_recipe.md); every family: tests/test_encoders.py.
    import open_clip

    encoder = tiny_exemplar_encoder(str(cache_dir), context_dim=24)
    clip = open_clip.create_model(f"local-dir:{tiny_clip_folder(cache_dir)}")
    pixels = torch.rand(2, 3, 32, 32)
    normalised = (pixels - encoder.mean) / encoder.std
    clip.visual.proj = None
    expected = clip.visual(normalised)
    assert torch.allclose(encoder.clip_features(pixels)[:, 0], expected, atol=1e-6)
    assert expected.shape[-1] == clip.visual.transformer.width  # pre-projection width


def test_zero_init_widening_keeps_the_pretrained_output(cache_dir):
    original = UNet2DConditionModel.from_pretrained(tiny_sd_folder(cache_dir), subfolder="unet")
    widened = widen_input(
        UNet2DConditionModel.from_pretrained(tiny_sd_folder(cache_dir), subfolder="unet")
    )
    assert widened.conv_in.in_channels == 9 and widened.config.in_channels == 9
    latents = torch.randn(2, 4, 8, 8)
    extra = torch.randn(2, 5, 8, 8) * 10  # whatever the new channels hold
    context = torch.randn(2, 1, 32)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = original(latents, t, context).sample
        got = widened(torch.cat([latents, extra], 1), t, context).sample
    assert torch.allclose(got, expected, atol=1e-5)


def test_backbone_from_single_original_layout_file_equals_the_folder(cache_dir, tmp_path):
    folder = tiny_sd_folder(cache_dir)
    from_folder = tiny_backbone(str(cache_dir))
    # Write the same weights as one SD-style .safetensors (model.diffusion_model.*, first_stage_model.*)
    base_unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    state = {
        **unet_to_ldm(base_unet.state_dict(), base_unet.config),
        **vae_to_ldm(from_folder.vae.state_dict(), from_folder.vae.config),
    }
    single = tmp_path / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    # The architecture comes from a config folder, as for a real SD 1.x file.
    config = tmp_path / "arch"
    for part in ("unet", "vae"):
        (config / part).mkdir(parents=True)
        (config / part / "config.json").write_text((folder / part / "config.json").read_text())
    from_file = load_backbone(str(single), config=str(config))
    for a, b in [(from_file.unet, from_folder.unet), (from_file.vae, from_folder.vae)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_with_the_wrong_architecture_names_the_fix(cache_dir, tmp_path):
    folder = tiny_sd_folder(cache_dir)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    single = tmp_path / "tiny.safetensors"
    save_file(
        {k: v.contiguous() for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()},
        str(single),
    )
    with pytest.raises(ValueError, match="model.backbone.config"):
        load_backbone(str(single))  # default SD 1.5 architecture does not fit tiny weights


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda tmp: tmp / "missing", "no Stable Diffusion weights"),
        (lambda tmp: tmp, "not a diffusers folder"),
        (lambda tmp: tmp / "weights.txt", "neither a diffusers folder"),
    ],
)
def test_bad_backbone_paths_fail_fast_naming_path_and_override(tmp_path, make_path, message):
    (tmp_path / "weights.txt").write_text("x")
    path = make_path(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError), match=message) as info:
        load_backbone(str(path))
    assert "model.backbone.path" in str(info.value) and str(path) in str(info.value)


def test_tiny_unet_config_is_an_sd_style_4_channel_checkpoint(cache_dir):
    config = json.loads((tiny_sd_folder(cache_dir) / "unet" / "config.json").read_text())
    assert (
        config["in_channels"] == 4
        and config["cross_attention_dim"] == TINY_UNET["cross_attention_dim"]
    )


def test_unet_attention_runs_through_pytorch_sdpa(cache_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = tiny_backbone(str(cache_dir)).unet
    processors = set(type(p) for p in unet.attn_processors.values())
    assert processors == {AttnProcessor2_0}
