"""Tiny models of the real classes, saved in the real formats: random ones for the tests,
"pretrained" ones for the demo.

The demo and the tests load them through exactly the code paths real weights take (a
diffusers folder for VAE + UNet, read by ``load_backbone``; an open_clip ``local-dir:`` folder
for CLIP), so nothing about loading is mocked. Generated once per cache folder,
deterministically.

- ``model/backbone=tiny``, ``model/encoder=tiny``: random weights, in a second; enough to test
  that everything runs.
- ``model/backbone=demo``, ``model/encoder=demo``: the VAE and the CLIP tower trained on the
  demo world first (``pretrain.py``, about 45 s on one core, once per cache), the
  stand-ins for Stable Diffusion's VAE and OpenAI's CLIP without which no edit can show the
  exemplar. The UNet stays random, as Paint by Example's would be without SD's weights.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

from pbe_lightning.demo import pretrain
from pbe_lightning.demo.cache import generate_once
from pbe_lightning.models.backbone import Backbone, load_backbone
from pbe_lightning.models.encoder import Bottleneck, ExemplarEncoder, build_exemplar_encoder

log = logging.getLogger(__name__)

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,  # like a Stable Diffusion checkpoint: widened to 9 on load
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(16, 16, 32, 32),  # 4 levels: 8x downscaling, as in SD
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
# 4 layers: diffusers' PaintByExampleImageEncoder derives mapper depth (4 + 1) // 5 = 1 from it.
TINY_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}

# The demo's: one GroupNorm group, which pretrain.codec_init starts the VAE from, and 8
# channels at full resolution: encoding the image and the masked image is the largest part of
# a demo training step on a CPU, and 16 there took 2-4x as long to encode, for no better
# reconstruction (measured: 16 channels after 300 steps 22.5 dB, 8 after 150 steps 22.7 dB).
DEMO_VAE = {**TINY_VAE, "norm_num_groups": 1, "block_out_channels": (8, 16, 32, 32)}
DEMO_UNET = TINY_UNET
DEMO_MODELS = "models-v2"  # a new name when the demo's models or their training change
# From the codec init 150 steps reach ~22.7 dB on held-out scenes (the init: ~20.3 dB).
VAE_TRAINING = dict(steps=150, batch_size=16, resolution=64, patch=32, lr=1e-3)
CLIP_TRAINING = dict(steps=300, batch_size=64)


# --- random ---------------------------------------------------------------------------------
def write_tiny_sd(folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")


def write_clip(folder: Path, model: open_clip.CLIP) -> None:
    """An open_clip ``local-dir:`` folder: config (with the preprocessing) and safetensors."""
    size = TINY_CLIP["vision_cfg"]["image_size"]
    config = {
        "model_cfg": TINY_CLIP,
        "preprocess_cfg": {"mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD, "size": size},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))


def write_tiny_clip(folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    write_clip(folder, open_clip.CLIP(**TINY_CLIP))


# --- trained on the demo world --------------------------------------------------------------
@contextmanager
def one_thread() -> Iterator[None]:
    """Pretrain on one intra-op thread: on models this small a second thread gains little,
    and where the cores are shared (a data worker, another job) its spin-waits made the VAE's
    pretraining several times slower than on one thread (measured on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_demo_sd(folder: Path, seed: int = 0) -> None:
    """The demo's VAE, trained (``pretrain.train_vae``), and a random UNet, as a diffusers
    folder; ``vae/pretraining.json`` records how and how well (held-out PSNR)."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    vae = pretrain.codec_init(AutoencoderKL(**DEMO_VAE))
    with one_thread():
        pretrain.train_vae(vae, seed=seed, **VAE_TRAINING)
        psnr = pretrain.reconstruction_psnr(vae, VAE_TRAINING["resolution"], seed)
    vae.save_pretrained(folder / "vae")
    record = {
        **VAE_TRAINING,
        "held_out_psnr_db": round(psnr, 2),
        "seconds": time.perf_counter() - started,
    }
    (folder / "vae" / "pretraining.json").write_text(json.dumps(record, indent=1))
    log.info("demo VAE trained: %.1f dB PSNR on held-out scenes (%.0f s)", psnr, record["seconds"])
    torch.manual_seed(seed)
    UNet2DConditionModel(**DEMO_UNET).save_pretrained(folder / "unet")


def write_demo_clip(folder: Path, seed: int = 0) -> None:
    """The tiny CLIP with its vision tower trained on demo-world objects (``pretrain``)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP)
    size = TINY_CLIP["vision_cfg"]["image_size"]
    with one_thread():
        pretrain.train_clip_tower(
            model.visual, size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, seed=seed, **CLIP_TRAINING
        )
    write_clip(folder, model)


# --- folders and the config targets ---------------------------------------------------------
def tiny_sd_folder(cache_dir: str | os.PathLike) -> Path:
    return generate_once(Path(cache_dir) / "tiny" / "sd", write_tiny_sd)


def tiny_clip_folder(cache_dir: str | os.PathLike) -> Path:
    return generate_once(Path(cache_dir) / "tiny" / "clip", write_tiny_clip)


def demo_sd_folder(cache_dir: str | os.PathLike) -> Path:
    folder = Path(cache_dir) / "demo" / DEMO_MODELS / "sd"
    if not folder.is_dir():
        log.info("training the demo's VAE on the demo world, once per cache (%s)", folder)
    return generate_once(folder, partial(write_demo_sd, seed=0))


def demo_clip_folder(cache_dir: str | os.PathLike) -> Path:
    """The demo's CLIP tower, trained on demo-world objects."""
    folder = Path(cache_dir) / "demo" / DEMO_MODELS / "clip"
    if not folder.is_dir():
        log.info("training the demo's CLIP tower on the demo world, once per cache (%s)", folder)
    return generate_once(folder, partial(write_demo_clip, seed=0))


def tiny_backbone(cache_dir: str, pretrained: bool = False) -> Backbone:
    """``model/backbone=tiny`` (random) or ``=demo`` (``pretrained``: the trained VAE):
    generate the diffusers folder once and load it like real weights.

    Also writes the tiny random CLIP, experiment=demo's metrics CLIP (``metrics_clip.arch``):
    every demo run builds a backbone, whichever exemplar encoder (``ablation=encoder``) it has.
    """
    tiny_clip_folder(cache_dir)
    folder = demo_sd_folder(cache_dir) if pretrained else tiny_sd_folder(cache_dir)
    return load_backbone(str(folder))


def tiny_exemplar_encoder(
    cache_dir: str,
    context_dim: int,
    bottleneck: Bottleneck = "cls",
    mapper_depth: int = 1,
    pretrained: bool = False,
) -> ExemplarEncoder:
    """``model/encoder=tiny`` (random) or ``=demo`` (``pretrained``: the trained tower): a tiny
    open_clip ViT in a ``local-dir:`` folder, loaded normally."""
    folder = demo_clip_folder(cache_dir) if pretrained else tiny_clip_folder(cache_dir)
    return build_exemplar_encoder(
        f"local-dir:{folder}", context_dim, None, bottleneck, mapper_depth
    )
