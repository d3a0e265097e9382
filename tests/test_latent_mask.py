"""The UNet's mask channel: the pixel mask resized to the latents, as ``model.latent_mask``
says. bilinear is the public Paint-by-Example code's (torchvision ``Resize`` on a tensor:
bilinear, no antialiasing), nearest is diffusers' pipeline's."""

import numpy as np
import pytest
import torch

from pbe_lightning.models.build import build_model
from pbe_lightning.models.samplers import latent_mask


def soft_mask(size: int = 512, seed: int = 0) -> torch.Tensor:
    """Two holes whose edges are off the 8-pixel grid, and soft values everywhere."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 1, size, size)
    at = [round(f * size) for f in (0.07, 0.59, 0.18, 0.89, 0.01, 0.39, 0.29, 0.33)]
    mask[0, :, at[0] : at[1], at[2] : at[3]] = 0
    mask[1, :, at[4] : at[5], at[6] : at[7]] = 0
    return (mask + 0.3 * torch.rand(mask.shape, generator=g)).clamp(0, 1)


def test_bilinear_takes_the_middle_of_each_latent_cell_and_nearest_its_corner():
    mask = soft_mask()
    pixels = mask.numpy()
    # Resize by 8 without antialiasing reads at 8j + 3.5: the mean of pixels 8j+3 and 8j+4.
    rows = (pixels[..., 3::8, :] + pixels[..., 4::8, :]) / 2
    middle = (rows[..., 3::8] + rows[..., 4::8]) / 2
    assert np.allclose(latent_mask(mask, (64, 64), "bilinear").numpy(), middle, atol=1e-6)
    assert np.array_equal(latent_mask(mask, (64, 64), "nearest").numpy(), pixels[..., ::8, ::8])


def test_an_unknown_mode_names_the_setting():
    with pytest.raises(ValueError, match="model.latent_mask"):
        latent_mask(soft_mask(64), (8, 8), "area")


@pytest.fixture
def model(tiny_cfg):
    return build_model(tiny_cfg("model.latent_mask=nearest").model)


def mask_channel(model, run) -> torch.Tensor:
    seen = []
    hook = model.unet.conv_in.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        run()
    finally:
        hook.remove()
    return seen[0][:, 8:9]


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_training_and_painting_resize_the_mask_as_configured(model, mode):
    assert model.latent_mask == "nearest"  # the config's value reached the module
    model.latent_mask = mode
    mask = soft_mask(64)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    batch = dict(
        image=image, mask=mask, masked_image=image * mask, reference=torch.rand(2, 3, 64, 64)
    )
    drop = torch.zeros(2, dtype=torch.bool)
    expected = latent_mask(mask, (8, 8), mode)
    trained = mask_channel(model, lambda: model.diffusion_loss(batch, drop))
    painted = mask_channel(model, lambda: model.paint(batch, steps=1, guidance_scale=1.0))
    assert torch.equal(trained, expected) and torch.equal(painted, expected)
    other = "bilinear" if mode == "nearest" else "nearest"
    assert not torch.equal(expected, latent_mask(mask, (8, 8), other))


def test_a_bad_setting_fails_when_the_model_is_built(tiny_cfg):
    with pytest.raises(ValueError, match="model.latent_mask"):
        build_model(tiny_cfg("model.latent_mask=area").model)
