"""Training-step throughput of the real architecture: SD 1.x UNet + VAE and CLIP ViT-L/14.

    python -m bench.train_throughput --device cuda                      # 512 px, batch 4, bf16
    python -m bench.train_throughput --device cuda --batch 8 --no-checkpointing
    python -m bench.train_throughput --arch tiny --resolution 64         # a CPU smoke run

Weights are random (built from the packaged SD 1.x configs and open_clip's ViT-L-14-quickgelu
config): speed and memory do not depend on their values, and nothing has to be downloaded.
Times the full step the LightningModule runs (VAE encode, CLIP, mapper, UNet forward and
backward, AdamW) with the batch already on the device; prints ms/step, samples/s and peak
memory. Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import open_clip
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from pbe_lightning.demo.tiny_models import TINY_CLIP, TINY_UNET, TINY_VAE
from pbe_lightning.models.backbone import SD15_CONFIG, Backbone, widen_input
from pbe_lightning.models.encoder import ExemplarEncoder, clip_image_size
from pbe_lightning.models.module import PaintByExampleModule


def build(arch: str, checkpointing: bool) -> PaintByExampleModule:
    if arch == "sd15":
        unet = UNet2DConditionModel.from_config(
            json.loads((SD15_CONFIG / "unet" / "config.json").read_text())
        )
        vae = AutoencoderKL.from_config(
            json.loads((SD15_CONFIG / "vae" / "config.json").read_text())
        )
        visual, depth = open_clip.create_model("ViT-L-14-quickgelu").visual, 5
    else:
        unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
        visual, depth = open_clip.CLIP(**TINY_CLIP).visual, 1
    size = clip_image_size(visual)
    encoder = ExemplarEncoder(
        visual,
        visual.transformer.width,
        unet.config.cross_attention_dim,
        size,
        OPENAI_DATASET_MEAN,
        OPENAI_DATASET_STD,
        mapper_depth=depth,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return PaintByExampleModule(
        Backbone(vae.requires_grad_(False), widen_input(unet)),
        encoder,
        scheduler,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-5),
        gradient_checkpointing=checkpointing,
    )


def fake_batch(batch: int, resolution: int, reference: int, device: torch.device) -> dict:
    image = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    mask = torch.ones(batch, 1, resolution, resolution, device=device)
    mask[:, :, resolution // 4 : resolution // 2, resolution // 4 : resolution // 2] = 0
    return {
        "image": image,
        "mask": mask,
        "masked_image": image * mask,
        "reference": torch.rand(batch, 3, reference, reference, device=device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--reference-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    module = build(args.arch, checkpointing=not args.no_checkpointing).to(device)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = fake_batch(args.batch, args.resolution, args.reference_size, device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else nullcontext()
    )
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = module.diffusion_loss(batch, module.draw_dropout(args.batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    )
    trainable = sum(p.numel() for p in module.trainable_parameters()) / 1e6
    print(
        f"{args.arch} {args.resolution}px batch {args.batch} {args.precision} "
        f"checkpointing={not args.no_checkpointing} on {device}: {ms:.1f} ms/step (median of "
        f"{args.steps}), {args.batch / ms * 1000:.2f} samples/s, peak {peak:.1f} GiB, "
        f"{trainable:.0f}M trainable parameters, loss {loss.item():.3f}"
    )


if __name__ == "__main__":
    main()
