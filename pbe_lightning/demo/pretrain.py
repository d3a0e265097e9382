""" "Pretraining" the demo's frozen parts on the demo world: a VAE that reconstructs its scenes
and a CLIP tower whose pooled token knows an object's colour and shape.

Paint by Example starts from Stable Diffusion's VAE and OpenAI's CLIP; neither exists for the
demo world and neither can be downloaded, so the demo trains tiny stand-ins of the same classes
here, deterministically, once per cache (``tiny_models.demo_sd_folder``/``demo_clip_folder``).
Without them the demo cannot show the method: a random VAE decodes every latent to noise, and a
random CLIP's pooled token only weakly tells exemplar colours apart.

- VAE (``diffusers.AutoencoderKL``): reconstruction MSE on random square crops of demo scenes
  (the framing training crops have), plus a tiny KL term; its ``scaling_factor`` is then set so
  that scaled latents have unit standard deviation, as SD's 0.18215 does for SD's VAE.
- CLIP (``open_clip.CLIP``'s vision tower): the pooled token (pre-projection, what the exemplar
  encoder reads) regresses the object's colour and classifies its shape through a linear head
  that is thrown away, and is the same for an object on its own background and on another
  one: the stand-in for what web-scale pretraining teaches the real one, whose pooled token
  says what the object is far more than what lies around it. Without that invariance the
  pooled token carried the exemplar's background as well as its object (linear read-outs of
  both, R^2 ~0.75), and a model trained on it painted the exemplar crop's mean colour.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from pbe_lightning.demo.world import SHAPES, background, random_scene, silhouette

PRETRAIN_STREAM = 1  # scenes drawn as rng([seed, PRETRAIN_STREAM, i]): not the shards' scenes
HELD_OUT_STREAM = 2  # scenes for measuring, never trained on


def world_scenes(seed: int, stream: int, count: int, size: int = 128) -> torch.Tensor:
    """``(count, 3, size, size)`` demo-world scenes in [0, 1]."""
    pixels = [
        random_scene(np.random.default_rng([seed, stream, i]), size).pixels for i in range(count)
    ]
    return torch.from_numpy(np.stack(pixels)).float().permute(0, 3, 1, 2)


def random_crops(
    scenes: torch.Tensor, count: int, out: int, generator: torch.Generator, min_side: float = 0.4
) -> torch.Tensor:
    """Square crops of random scenes, ``min_side`` to all of the side, resized to ``out``."""
    size = scenes.shape[-1]
    crops = []
    for _ in range(count):
        index = int(torch.randint(len(scenes), (1,), generator=generator))
        side = int(torch.randint(int(min_side * size), size + 1, (1,), generator=generator))
        x, y = (int(torch.randint(size - side + 1, (1,), generator=generator)) for _ in range(2))
        crop = scenes[index : index + 1, :, y : y + side, x : x + side]
        crops.append(F.interpolate(crop, (out, out), mode="bilinear", antialias=True))
    return torch.cat(crops)


# --- VAE --------------------------------------------------------------------------------------
COLOUR, MIRROR, CONSTANT = slice(0, 3), slice(3, 6), 6  # feature channels of the codec init
CONSTANT_LEVEL = 20.0  # the constant channel's value: makes each GroupNorm a fixed affine map
SMOOTH = torch.tensor([1.0, 2.0, 1.0])


def codec_init(vae: AutoencoderKL, logvar: float = -7.0) -> AutoencoderKL:
    """Set ``vae``'s weights to a linear codec to train from: latents = 8x8 area means of RGB
    (the 4th channel free), decoded by three nearest-neighbour-and-smooth upsamplings.

    Why: trained from random weights, a VAE this small needs far more steps than a demo can
    spend (after 600 steps its reconstructions were still worse than a plain 8x8 average, at
    ~15 dB), because it must first discover how to carry absolute colour through the
    per-sample GroupNorm before its output. Here every residual branch and attention output
    starts at zero (an identity block, which still trains), features carry RGB and -RGB plus
    one constant channel, so every GroupNorm (one group) divides by a near-fixed std, and the
    SiLU after it cancels exactly in ``SiLU(z) - SiLU(-z) = z``. Needs ``norm_num_groups=1``
    and at least 7 channels per level.
    """
    if vae.config.norm_num_groups != 1 or min(vae.config.block_out_channels) < 7:
        raise ValueError("codec_init needs norm_num_groups=1 and >= 7 channels per level")
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for norm in (m for m in vae.modules() if isinstance(m, nn.GroupNorm)):
            norm.weight.fill_(1.0)  # the residual branches' norms: as a fresh GroupNorm
        _features_from(vae.encoder.conv_in, inputs=range(3))
        _features_from(vae.decoder.conv_in, inputs=range(3))
        for shortcut in (m.conv_shortcut for m in vae.modules() if _has_shortcut(m)):
            _identity(shortcut)
        for block in vae.encoder.down_blocks:
            for down in block.downsamplers or []:
                down.conv.weight[:, :, :2, :2] = (
                    torch.eye(down.conv.out_channels)[..., None, None] / 4
                )
        for block in vae.decoder.up_blocks:
            for up in block.upsamplers or []:
                kernel = torch.outer(SMOOTH, SMOOTH) / 16
                up.conv.weight.copy_(torch.eye(up.conv.out_channels)[..., None, None] * kernel)
                up.conv.weight[CONSTANT, CONSTANT] = 0.0
                up.conv.weight[CONSTANT, CONSTANT, 1, 1] = 1.0  # the constant stays constant
        latents = vae.config.latent_channels
        _readout(vae.encoder.conv_norm_out, vae.encoder.conv_out, outputs=range(3))
        vae.encoder.conv_out.bias[latents:] = logvar
        _readout(vae.decoder.conv_norm_out, vae.decoder.conv_out, outputs=range(3))
        _identity(vae.quant_conv)
        _identity(vae.post_quant_conv)
    return vae


def _has_shortcut(module: nn.Module) -> bool:
    return getattr(module, "conv_shortcut", None) is not None


def _identity(conv: nn.Conv2d) -> None:
    """Copy input channel i to output channel i (as many as both have), centre tap."""
    count = min(conv.in_channels, conv.out_channels)
    centre = conv.kernel_size[0] // 2
    conv.weight[range(count), range(count), centre, centre] = 1.0


def _features_from(conv: nn.Conv2d, inputs: range) -> None:
    """Input channels -> feature channels [x, -x, constant]."""
    for channel in inputs:
        conv.weight[COLOUR.start + channel, channel, 1, 1] = 1.0
        conv.weight[MIRROR.start + channel, channel, 1, 1] = -1.0
    conv.bias[CONSTANT] = CONSTANT_LEVEL


def _readout(norm: nn.GroupNorm, conv: nn.Conv2d, outputs: range) -> None:
    """GroupNorm -> SiLU -> conv reads back x from the [x, -x, constant] features.

    With x and -x in the group the mean is exactly ``CONSTANT_LEVEL / C``; the std is that of
    the constant channel up to x's small share, so scaling by it undoes the normalisation.
    """
    channels = norm.num_channels
    mean = CONSTANT_LEVEL / channels
    std = (CONSTANT_LEVEL**2 / channels - mean**2) ** 0.5
    norm.weight.zero_()
    norm.weight[COLOUR] = std
    norm.weight[MIRROR] = std
    norm.bias[COLOUR] = mean
    norm.bias[MIRROR] = mean
    for channel in outputs:
        conv.weight[channel, COLOUR.start + channel, 1, 1] = 1.0
        conv.weight[channel, MIRROR.start + channel, 1, 1] = -1.0


def train_vae(
    vae: AutoencoderKL,
    steps: int,
    batch_size: int,
    resolution: int,
    seed: int = 0,
    scenes: int = 512,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    patch: int = 32,
) -> AutoencoderKL:
    """Fit ``vae`` to crops of demo scenes at ``resolution``, then set its ``scaling_factor``."""
    generator = torch.Generator().manual_seed(seed)
    pool = world_scenes(seed, PRETRAIN_STREAM, scenes)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps, pct_start=0.05)
    vae.train()
    for _ in range(steps):
        pixels = random_crops(pool, batch_size, resolution, generator) * 2 - 1
        if patch < resolution:  # the codec is convolutional: patches teach it as well, cheaper
            x, y = (
                int(torch.randint(resolution - patch + 1, (1,), generator=generator))
                for _ in range(2)
            )
            pixels = pixels[..., y : y + patch, x : x + patch]
        posterior = vae.encode(pixels).latent_dist
        decoded = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = F.mse_loss(decoded, pixels) + kl_weight * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    vae.eval()
    latents = encode_mode(vae, random_crops(pool, 64, resolution, generator) * 2 - 1)
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
    return vae


@torch.no_grad()
def encode_mode(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels).latent_dist.mode()


@torch.no_grad()
def reconstruction_psnr(
    vae: AutoencoderKL, resolution: int, seed: int = 0, count: int = 64
) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of held-out demo scenes through ``vae``, posterior
    sampled as training and painting do."""
    generator = torch.Generator().manual_seed(seed)
    pixels = random_crops(world_scenes(seed, HELD_OUT_STREAM, count), count, resolution, generator)
    latents = vae.encode(pixels * 2 - 1).latent_dist.sample(generator)
    decoded = (vae.decode(latents).sample.clamp(-1, 1) + 1) / 2
    mse = (decoded - pixels).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


# --- CLIP -------------------------------------------------------------------------------------
def object_views(
    seed: int, stream: int, count: int, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` exemplar-like crops (an object padded by 0-16 px, as references are), the same
    objects in the same frames on another random background, both resized to ``size``, each
    object's colour ``(count, 3)`` and shape index ``(count,)``."""
    crops, elsewhere, colours, shapes = [], [], [], []
    index = 0
    while len(crops) < count:
        rng = np.random.default_rng([seed, stream, index])
        scene = random_scene(rng)
        index += 1
        side = scene.pixels.shape[0]
        for thing in scene.objects:
            alpha = silhouette(thing.shape, thing.box, side)[..., None]
            other = background(rng, side)[0] * (1 - alpha) + np.asarray(thing.colour) * alpha
            pad = float(torch.randint(0, 17, (1,), generator=generator))
            x0, y0, x1, y1 = thing.box
            left, top = max(0, math.floor(x0 - pad)), max(0, math.floor(y0 - pad))
            right, bottom = min(side, math.ceil(x1 + pad)), min(side, math.ceil(y1 + pad))
            for views, pixels in ((crops, scene.pixels), (elsewhere, other)):
                crop = torch.from_numpy(pixels[top:bottom, left:right]).float()
                crop = crop.permute(2, 0, 1)[None]
                views.append(F.interpolate(crop, (size, size), mode="bilinear", antialias=True))
            colours.append(thing.colour)
            shapes.append(SHAPES.index(thing.shape))
    return (
        torch.cat(crops[:count]),
        torch.cat(elsewhere[:count]),
        torch.tensor(colours[:count], dtype=torch.float32),
        torch.tensor(shapes[:count]),
    )


def object_crops(
    seed: int, stream: int, count: int, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The crops of :func:`object_views` (on their own backgrounds), colours and shapes."""
    crops, _, colours, shapes = object_views(seed, stream, count, size, generator)
    return crops, colours, shapes


def jitter(crops: torch.Tensor, generator: torch.Generator, degrees: float = 20.0) -> torch.Tensor:
    """Flips, rotations and scalings (mirrored borders): what reference augmentation does."""
    n = crops.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    scale = 0.85 + 0.3 * torch.rand(n, generator=generator)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, torch.zeros(n)], 1),
            torch.stack([sin * flip, cos, torch.zeros(n)], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(crops.shape), align_corners=False)
    return F.grid_sample(crops, grid, padding_mode="reflection", align_corners=False)


def pooled_token(
    visual: nn.Module, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """The pre-projection pooled token, as ``ExemplarEncoder.clip_features`` reads it."""
    projection, visual.proj = visual.proj, None
    try:
        return visual((pixels - mean) / std)
    finally:
        visual.proj = projection


def train_clip_tower(
    visual: nn.Module,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    crops: int = 2048,
    lr: float = 1e-3,
    invariance: float = 0.1,
) -> nn.Module:
    """Teach the tower's pooled token an object's colour (regressed) and shape (classified),
    and (``invariance``) to be the same whatever the background around the object."""
    generator = torch.Generator().manual_seed(seed)
    pool, elsewhere, colours, shapes = object_views(
        seed, PRETRAIN_STREAM, crops, image_size, generator
    )
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    head = nn.Linear(visual.transformer.width, 3 + len(SHAPES))
    parameters = [*visual.parameters(), *head.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps, pct_start=0.1)
    visual.train()
    for _ in range(steps):
        rows = torch.randint(len(pool), (batch_size,), generator=generator)
        views = torch.cat([jitter(pool[rows], generator), jitter(elsewhere[rows], generator)])
        tokens = pooled_token(visual, views, mean_t, std_t)
        out = head(tokens)
        loss = 10 * F.mse_loss(out[:, :3], colours[rows].repeat(2, 1)) + F.cross_entropy(
            out[:, 3:], shapes[rows].repeat(2)
        )
        here, there = tokens.chunk(2)
        scale = tokens.detach().var(dim=0).mean() + 1e-6  # relative: shrinking cannot cheat
        loss = loss + invariance * (here - there).pow(2).mean() / scale
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return visual.eval()
