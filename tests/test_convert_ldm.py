"""Round trips: ours (diffusers -> LDM), then diffusers' own LDM -> diffusers converters."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file

from pbe_lightning.convert.ldm import unet_to_ldm, vae_to_ldm

UNET_CONFIGS = {
    "two_levels": {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    },
    # Mixed attention / plain levels so both upsampler slots (.1.conv and .2.conv) occur.
    "three_levels": {
        "block_out_channels": (32, 32, 64),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    },
}
UNET_COMMON = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
VAE_CONFIG = {
    "block_out_channels": (16, 16, 32, 32),
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}


def _make(cls, seed: int, **config):
    torch.manual_seed(seed)
    return cls(**config).eval()


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        got = actual[key]
        assert got.shape == tensor.shape and got.dtype == tensor.dtype, key
        assert torch.equal(got, tensor), key


@pytest.fixture(params=sorted(UNET_CONFIGS))
def unet(request) -> UNet2DConditionModel:
    return _make(UNet2DConditionModel, 0, **UNET_COMMON, **UNET_CONFIGS[request.param])


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return _make(AutoencoderKL, 0, **VAE_CONFIG)


def test_unet_roundtrip_is_bit_identical(unet):
    sd = unet.state_dict()
    ldm = unet_to_ldm(sd, unet.config)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    _assert_same_state(back, sd)


def test_unet_roundtrip_forward_matches(unet):
    back = convert_ldm_unet_checkpoint(
        unet_to_ldm(unet.state_dict(), unet.config), dict(unet.config)
    )
    fresh = _make(UNet2DConditionModel, 1, **dict(unet.config))
    torch.manual_seed(2)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = unet(sample, t, text).sample
        assert not torch.equal(fresh(sample, t, text).sample, expected)
        fresh.load_state_dict(back, strict=True)
        assert torch.equal(fresh(sample, t, text).sample, expected)


def test_unet_ldm_keys(unet):
    sd = unet.state_dict()
    ldm = unet_to_ldm(sd, unet.config)
    assert len(ldm) == len(sd)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    p = "model.diffusion_model."
    assert torch.equal(ldm[p + "input_blocks.0.0.weight"], sd["conv_in.weight"])
    assert torch.equal(ldm[p + "time_embed.2.bias"], sd["time_embedding.linear_2.bias"])
    assert torch.equal(ldm[p + "out.2.weight"], sd["conv_out.weight"])
    assert p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    assert p + "middle_block.2.out_layers.3.weight" in ldm
    assert torch.equal(
        ldm[p + "input_blocks.1.0.in_layers.2.weight"], sd["down_blocks.0.resnets.0.conv1.weight"]
    )
    if unet.config.layers_per_block == 1:
        assert p + "input_blocks.2.0.op.weight" in ldm
        assert p + "output_blocks.1.1.conv.weight" in ldm  # plain level: upsampler at slot 1
        assert p + "output_blocks.2.1.proj_in.weight" in ldm
    else:
        assert p + "input_blocks.3.0.op.weight" in ldm
        assert p + "input_blocks.6.0.op.weight" in ldm
        assert p + "input_blocks.9.0.op.weight" not in ldm
        assert p + "output_blocks.2.2.conv.weight" in ldm  # attention level: slot 2
        assert p + "output_blocks.5.1.conv.weight" in ldm
        assert p + "output_blocks.8.1.transformer_blocks.0.norm3.bias" in ldm


def test_vae_roundtrip_is_bit_identical(vae):
    sd = vae.state_dict()
    back = convert_ldm_vae_checkpoint(vae_to_ldm(sd, vae.config), dict(vae.config))
    _assert_same_state(back, sd)


def test_vae_roundtrip_forward_matches(vae):
    back = convert_ldm_vae_checkpoint(vae_to_ldm(vae.state_dict(), vae.config), dict(vae.config))
    fresh = _make(AutoencoderKL, 1, **dict(vae.config))
    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = vae(x, sample_posterior=False).sample
        assert not torch.equal(fresh(x, sample_posterior=False).sample, expected)
        fresh.load_state_dict(back, strict=True)
        assert torch.equal(fresh(x, sample_posterior=False).sample, expected)


def test_vae_ldm_keys(vae):
    sd = vae.state_dict()
    ldm = vae_to_ldm(sd, vae.config)
    assert len(ldm) == len(sd)
    p = "first_stage_model."
    assert all(k.startswith(p) for k in ldm)
    q = ldm[p + "encoder.mid.attn_1.q.weight"]
    assert q.shape == (32, 32, 1, 1)
    assert torch.equal(q[:, :, 0, 0], sd["encoder.mid_block.attentions.0.to_q.weight"])
    assert ldm[p + "decoder.mid.attn_1.proj_out.weight"].ndim == 4
    assert ldm[p + "decoder.mid.attn_1.norm.weight"].ndim == 1
    assert p + "encoder.norm_out.weight" in ldm and p + "decoder.norm_out.bias" in ldm
    assert p + "encoder.down.1.block.0.conv1.weight" in ldm
    assert p + "encoder.down.2.block.0.nin_shortcut.weight" in ldm
    assert p + "encoder.down.2.downsample.conv.weight" in ldm
    assert p + "encoder.down.3.downsample.conv.weight" not in ldm
    assert p + "encoder.mid.block_2.norm2.bias" in ldm
    assert p + "quant_conv.weight" in ldm and p + "post_quant_conv.bias" in ldm
    # Decoder levels are reversed: LDM up.0 is the full-resolution level and has no upsampler.
    assert torch.equal(
        ldm[p + "decoder.up.3.upsample.conv.weight"],
        sd["decoder.up_blocks.0.upsamplers.0.conv.weight"],
    )
    assert p + "decoder.up.0.upsample.conv.weight" not in ldm
    assert p + "decoder.up.1.block.0.nin_shortcut.weight" in ldm
    assert p + "decoder.up.0.block.1.norm1.weight" in ldm


def test_single_file_checkpoint_via_safetensors(tmp_path, vae):
    # The real use: both parts in one .safetensors file, which rejects non-contiguous or
    # storage-sharing tensors, then diffusers picks each part out by its prefix.
    unet = _make(UNet2DConditionModel, 0, **UNET_COMMON, **UNET_CONFIGS["two_levels"])
    path = tmp_path / "model.safetensors"
    save_file(
        {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)},
        path,
    )
    ckpt = load_file(path)
    _assert_same_state(convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), unet.state_dict())
    _assert_same_state(convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), vae.state_dict())


def test_sd15_sized_unet_layout():
    # Meta tensors: checks the real SD v1 block numbering without allocating ~3.4 GB.
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768,
            attention_head_dim=8,
        )
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    blocks = {k.split(".")[2] + "." + k.split(".")[3] for k in ldm if "_block" in k.split(".")[2]}
    assert blocks == (
        {f"input_blocks.{i}" for i in range(12)}
        | {f"middle_block.{i}" for i in range(3)}
        | {f"output_blocks.{i}" for i in range(12)}
    )
    p = "model.diffusion_model."
    for key in (
        "input_blocks.3.0.op",
        "input_blocks.6.0.op",
        "input_blocks.9.0.op",
        "output_blocks.2.1.conv",
        "output_blocks.5.2.conv",
        "output_blocks.8.2.conv",
        "input_blocks.4.0.skip_connection",
        "output_blocks.11.1.proj_out",
    ):
        assert p + key + ".weight" in ldm, key
    assert not any(".input_blocks.10.1." in k or ".output_blocks.2.1.proj" in k for k in ldm)


def test_unknown_keys_raise():
    with pytest.raises(KeyError):
        unet_to_ldm({"mystery.weight": torch.zeros(1)}, {"layers_per_block": 1})
    with pytest.raises(KeyError):
        vae_to_ldm({"encoder.mystery.weight": torch.zeros(1)}, {"up_block_types": ["x"]})
    with pytest.raises(TypeError):
        unet_to_ldm({}, {"layers_per_block": (1, 2)})
