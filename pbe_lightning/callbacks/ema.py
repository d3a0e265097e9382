"""Exponential moving average of the trainable weights.

The EMA weights are used for validation (losses and sample grids) and export; they are
saved in checkpoints as ``pbe_ema`` (state-dict names -> tensors), restored on resume, and
never updated from a step whose update was skipped (non-finite gradients): the module's
``last_update_skipped`` flag scales the step to zero on the device, without a host read.

Why not Lightning's ``EMAWeightAveraging`` (``WeightAveraging``, Lightning 2.6): it wraps the
whole module in torch's ``AveragedModel``, whose ``update_parameters`` reads its step counter
back to the host twice per step (``bool(n_averaged == 0)``, ``n_averaged > 0``): the device
sync this framework keeps out of its steps (``tests/test_step_syncs.py``). Its average has no
way to skip a step on the device, so a skipped non-finite step would still move it. It copies
and averages the frozen VAE and CLIP tower too (a second copy of ~1.5 GB, updated for
nothing), and writes the average over the checkpoint's ``state_dict`` (the trained weights move
to ``current_model_state``), where export and resume read ``pbe_ema`` beside the trained
weights. And it cannot average FSDP shards either (it warns; this callback refuses
``trainer=fsdp``, which ``utils/config_checks.py`` also catches before anything loads).
"""

from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch

# The checkpoint entry holding the EMA weights (state-dict names -> tensors); export reads it.
EMA_KEY = "pbe_ema"


class EMA(L.Callback):
    def __init__(
        self, decay: float = 0.9999, start_step: int = 0, validate_with_ema: bool = True
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay} must be in (0, 1), e.g. 0.9999")
        self.decay = decay
        self.start_step = start_step
        self.validate_with_ema = validate_with_ema
        self.shadow: dict[str, torch.Tensor] = {}
        self._averaged_step: int | None = None  # the optimiser step last averaged in
        self._swapped: dict[str, torch.Tensor] | None = None

    @staticmethod
    def tracked(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            # Each rank holds only shards of the UNet: a per-rank average would be partial.
            raise ValueError(
                "callbacks=ema does not support trainer=fsdp yet: use trainer=ddp with EMA"
            )
        if not self.shadow:  # a resumed run already has its shadow from the checkpoint
            self.shadow = {n: p.detach().clone() for n, p in self.tracked(pl_module).items()}
        self.shadow = {n: t.to(pl_module.device) for n, t in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is None:  # the step was skipped: do not average in unchanged/bad weights
            return
        if trainer.global_step == self._averaged_step:
            return  # accumulating gradients: no optimiser step, the weights did not change
        self._averaged_step = trainer.global_step
        params = self.tracked(pl_module)
        if trainer.global_step <= self.start_step:
            for name, param in params.items():
                self.shadow[name].copy_(param)
            return
        names = list(params)
        skipped = getattr(pl_module, "last_update_skipped", None)
        if skipped is None:
            weight = 1 - self.decay
        else:
            weight = (1 - skipped.to(pl_module.device)) * (1 - self.decay)
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [params[n].detach() for n in names], weight
        )

    @contextmanager
    def swapped_in(self, pl_module: L.LightningModule):
        """Temporarily load the EMA weights into the module."""
        params = self.tracked(pl_module)
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(backup[name])

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.validate_with_ema and self.shadow and not trainer.sanity_checking:
            self._context = self.swapped_in(pl_module)
            self._context.__enter__()

    def on_validation_end(self, trainer, pl_module) -> None:
        context = getattr(self, "_context", None)
        if context is not None:
            context.__exit__(None, None, None)
            self._context = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[EMA_KEY] = {n: t.detach().cpu() for n, t in self.shadow.items()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if EMA_KEY in checkpoint:
            self.shadow = {n: t.clone() for n, t in checkpoint[EMA_KEY].items()}
