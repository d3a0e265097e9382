"""PaintByExampleModule: the training step. Pretrained parts are built elsewhere and injected."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin
from torch.optim import Optimizer

from pbe_lightning.batch_seeds import batch_generator
from pbe_lightning.logging_steps import is_logging_step
from pbe_lightning.models.backbone import Backbone, vae_downscale
from pbe_lightning.models.encoder import ExemplarEncoder
from pbe_lightning.models.samplers import (
    LATENT_MASK_MODES,
    encode_latents,
    latent_mask,
    make_sampler,
    paint,
)
from pbe_lightning.stops import RunStopped

DropoutMode = Literal["per_sample", "per_batch"]
# Frozen weights come back from the user's weight files; storing them in every checkpoint
# would add ~1.5 GB (SD VAE + CLIP ViT-L) per file for nothing.
FROZEN_PREFIXES = ("vae.", "encoder.vision.")


class PaintByExampleModule(L.LightningModule):
    def __init__(
        self,
        backbone: Backbone,
        encoder: ExemplarEncoder,
        noise_scheduler: SchedulerMixin,
        optimizer: Callable[[Iterable], Optimizer],
        lr_scheduler: Callable[[Optimizer], Any] | None = None,
        cfg_dropout: float = 0.2,
        cfg_dropout_mode: DropoutMode = "per_sample",
        gradient_checkpointing: bool = False,
        sampler: str = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 5.0,
        max_nonfinite_steps: int = 10,
        compile_unet: bool = False,
        model_config: dict | None = None,
        latent_mask: str = "nearest",
    ) -> None:
        super().__init__()
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"model.cfg_dropout={cfg_dropout} must be a probability in [0, 1]")
        if cfg_dropout_mode not in ("per_sample", "per_batch"):
            raise ValueError(
                f"model.cfg_dropout_mode={cfg_dropout_mode!r}: use per_sample or per_batch"
            )
        if latent_mask not in LATENT_MASK_MODES:
            raise ValueError(f"model.latent_mask={latent_mask!r}: use bilinear or nearest")
        self.latent_mask = latent_mask  # the mask channel's resize (models/samplers.py)
        self.vae = backbone.vae.requires_grad_(False).eval()
        self.unet = backbone.unet
        self.encoder = encoder
        self.noise_scheduler = noise_scheduler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.cfg_dropout = cfg_dropout
        self.cfg_dropout_mode = cfg_dropout_mode
        self.sampler_name = sampler
        self.sample_steps = sample_steps
        self.guidance_scale = guidance_scale
        self.max_nonfinite_steps = max_nonfinite_steps
        # Device tensors, read on the host only at logging steps (see stop_if_diverged).
        self.nonfinite_in_a_row = torch.zeros(())
        self.nonfinite_total = torch.zeros(())
        self.last_update_skipped = torch.zeros(())  # 1.0 when the last optimiser step was skipped
        self.training_resolution: int | None = None  # saved with checkpoints, for inference
        # Kept so a checkpoint alone can rebuild the model (export, edit, evaluate).
        self.model_config = model_config
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if compile_unet:
            # Compiles the forward only; parameters and state-dict keys stay those of the UNet.
            self.unet.compile()
        # Lightning keeps the train/eval modes modules arrive in, and diffusers loads in eval.
        self.train()

    def configure_model(self) -> None:
        """Under FSDP, shard only the trainable UNet (per block); Lightning then leaves the
        root unwrapped, so the frozen VAE and CLIP tower stay whole on every rank."""
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, FSDPStrategy):
            return
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy, wrap

        if isinstance(self.unet, FullyShardedDataParallel):
            return
        policy = ModuleWrapPolicy({BasicTransformerBlock, ResnetBlock2D})
        self.unet = wrap(self.unet, auto_wrap_policy=policy, use_orig_params=True)

    def pixel_multiple(self) -> int:
        """Image sides must divide by this: the VAE's downscale times the UNet's."""
        return vae_downscale(self.vae) * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def on_fit_start(self) -> None:
        # A resolution the VAE + UNet cannot halve evenly fails deep inside a conv otherwise.
        resolution = getattr(getattr(self.trainer.datamodule, "spec", None), "resolution", None)
        self.training_resolution = resolution
        multiple = self.pixel_multiple()
        if resolution is not None and resolution % multiple:
            raise ValueError(
                f"data.resolution={resolution} is not a multiple of {multiple}, which this VAE "
                f"and UNet need: use e.g. data.resolution={max(multiple, resolution // multiple * multiple)}"
            )

    # -- frozen parts stay frozen ---------------------------------------------------------
    def train(self, mode: bool = True) -> PaintByExampleModule:
        super().train(mode)
        self.vae.eval()
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.unet.parameters(), *self.encoder.trainable_parameters()]

    # -- the objective -----------------------------------------------------------------------
    def draw_dropout(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Which samples lose their exemplar (CFG training): ``(B,)`` bool."""
        shape = (batch_size,) if self.cfg_dropout_mode == "per_sample" else (1,)
        drop = torch.rand(shape, generator=generator, device=self.device) < self.cfg_dropout
        return drop.expand(batch_size)

    def contexts(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention context of the exemplars and the learned unconditional one."""
        context = self.encoder(reference)
        uncond = self.encoder.unconditional(context.shape[0], context.shape[1]).to(context.dtype)
        return context, uncond

    def condition(self, reference: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        context, uncond = self.contexts(reference)
        return torch.where(drop[:, None, None], uncond, context)

    def encode_pair(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target and masked-image latents in one VAE call (half the launches of two)."""
        with torch.no_grad():
            both = encode_latents(
                self.vae, torch.cat([batch["image"], batch["masked_image"]]), generator
            )
        return both.chunk(2)

    def diffusion_loss(
        self, batch: dict, drop: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        latents, masked_latents = self.encode_pair(batch, generator)
        mask = latent_mask(batch["mask"], latents.shape[-2:], self.latent_mask)
        noise = torch.randn(
            latents.shape, generator=generator, device=self.device, dtype=latents.dtype
        )
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        context = self.condition(batch["reference"], drop)
        unet_input = torch.cat([noisy, masked_latents, mask.to(noisy.dtype)], dim=1)
        prediction = self.unet(unet_input, t, encoder_hidden_states=context).sample
        return F.mse_loss(prediction.float(), noise.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch_size = batch["image"].shape[0]
        # The batch's own draws, different on every rank (pbe_lightning/batch_seeds.py).
        drop = self.draw_dropout(batch_size, batch_generator(batch, "cfg_dropout", self.device))
        loss = self.diffusion_loss(batch, drop, batch_generator(batch, "diffusion", self.device))
        # Not prog_bar: Lightning reads those back every step (the progress bar shows it).
        self.log("train/loss", loss, batch_size=batch_size)
        return loss

    # -- non-finite steps, decided on the device ---------------------------------------------
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Skip the update when any gradient is non-finite, without the host looking.

        After DDP's all-reduce every rank holds the same gradients, so every rank reaches the
        same verdict with no extra collective; a NaN loss on one rank makes them NaN on all.
        """
        if self.grad_scaler() is not None:
            return  # fp16: the GradScaler skips overflowing steps itself (and lowers its scale)
        skipped = nonfinite_gradients(self.trainable_parameters())
        self.last_update_skipped = skipped
        self.nonfinite_in_a_row = (self.nonfinite_in_a_row.to(skipped) + skipped) * skipped
        self.nonfinite_total = self.nonfinite_total.to(skipped) + skipped
        skip_update_if(optimizer, skipped)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as Lightning would, for fused optimisers too.

        Lightning refuses to clip under mixed precision when the optimiser unscales inside
        its step (fused AdamW), since the gradients might still be scaled. bf16 never scales
        them, and under fp16's GradScaler they are unscaled here first, so clipping is right.
        """
        if not gradient_clip_val:
            return
        if (scaler := self.grad_scaler()) is not None:
            scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        # train/lr/<param group>: callbacks.lr_monitor (Lightning's LearningRateMonitor).
        if is_logging_step(self.trainer):  # stop_if_diverged reads a device value
            self.log("train/nonfinite_steps", self.nonfinite_total, batch_size=1)
            self.stop_if_diverged()

    def on_train_end(self) -> None:
        self.stop_if_diverged()

    def stop_if_diverged(self) -> None:
        """Read at logging steps only: skipped updates leave the weights as they were, so
        noticing a few steps late loses nothing."""
        in_a_row = int(self.nonfinite_in_a_row)
        if in_a_row >= self.max_nonfinite_steps:
            raise RunStopped(
                f"the loss or its gradients were non-finite for {in_a_row} steps in a row "
                f"(model.max_nonfinite_steps={self.max_nonfinite_steps}; the updates were "
                "skipped): training diverged; lower model.optimizer.lr, set "
                "trainer.gradient_clip_val, or resume from an earlier checkpoint"
            )

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Fixed noise per batch: val/loss then moves only when the model does.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        batch_size = batch["image"].shape[0]
        no_drop = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        loss = self.diffusion_loss(batch, no_drop, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        return loss

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def paint(
        self,
        batch: dict,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Edited images in [-1, 1] for a batch in the data contract."""
        context, uncond = self.contexts(batch["reference"])
        return paint(
            self.unet,
            self.vae,
            make_sampler(sampler or self.sampler_name, self.noise_scheduler),
            context,
            uncond,
            batch["masked_image"],
            batch["mask"],
            steps or self.sample_steps,
            self.guidance_scale if guidance_scale is None else guidance_scale,
            generator,
            mask_mode=self.latent_mask,
        )

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        groups = [
            {"params": list(self.unet.parameters()), "name": "unet"},
            {"params": self.encoder.trainable_parameters(), "name": "mapper"},
        ]
        optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            # LearningRateMonitor's key: train/lr/unet and train/lr/mapper (the groups' names)
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    # -- checkpoints -------------------------------------------------------------------------
    def architecture(self, resolution: int | None = None) -> dict:
        """What a resumed run must share with its checkpoint, keyed by the setting to change.

        Read from the built modules, not the config, so a backbone folder swapped under the
        same ``model.backbone.path`` is caught too.
        """
        unet = getattr(self.unet, "_fsdp_wrapped_module", self.unet).config
        return {
            **self.encoder.architecture(),  # family, bottleneck, tokens, mapper, tower shape
            "model.backbone (UNet block_out_channels)": list(unet.block_out_channels),
            "model.backbone (UNet cross_attention_dim)": unet.cross_attention_dim,
            "model.backbone (UNet layers_per_block)": unet.layers_per_block,
            "data.resolution": resolution or self.training_resolution,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        checkpoint["pbe_model_config"] = self.model_config
        checkpoint["pbe_resolution"] = self.training_resolution
        checkpoint["pbe_architecture"] = self.architecture()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.training_resolution = checkpoint.get("pbe_resolution")
        own = self.state_dict()
        checkpoint["state_dict"].update(
            {k: v for k, v in own.items() if k.startswith(FROZEN_PREFIXES)}
        )


def nonfinite_gradients(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """1.0 if any gradient holds an inf or NaN, else 0.0: a device scalar, one fused read."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack(torch._foreach_norm(grads)).float().sum()
    return (~torch.isfinite(total)).float()


def skip_update_if(optimizer: Optimizer, skipped: torch.Tensor) -> None:
    """Have the optimiser skip this update when ``skipped`` is 1.

    Fused optimisers (``fused=True`` AdamW, the default) take the flag as ``GradScaler``
    hands it to them and skip inside their kernel: no host sync. Others cannot skip on the
    device; their gradients are dropped after a host read of the flag (one sync per step).
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = skipped.to(torch.float32)
        optimizer.grad_scale = None
    elif skipped.item():
        optimizer.zero_grad(set_to_none=True)
