"""``callbacks.frozen_dtype``: the frozen VAE and CLIP tower stored in bf16 while training.

They never train, so no gradient or optimiser state depends on their precision; storing them
in bf16 halves their weight memory. Under bf16-mixed their convolutions and matmuls compute in
bf16 already (autocast casts the fp32 weights at every call), so only the rounding of their
norm weights and biases changes. Inputs are cast to the stored dtype and outputs back to
float32 at each frozen part's boundary, so everything around them (the latents, the mapper's
input, painting outside autocast) sees the dtypes it sees without this option, in any
``trainer.precision``. (Lightning's ``bf16-true`` precision casts the whole module, the trained
UNet and its optimiser state included: not what this is.)

The callback casts at ``setup``, before Lightning moves the module to the device, so the fp32
copies never reach the GPU. Checkpoints are unaffected: they hold no frozen weights, which
are reloaded from their files. Enabled by ``memory=24gb``; ``callbacks.frozen_dtype.dtype=fp32``
turns it off there. The memory planner casts its fake module with :func:`cast_frozen` too.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils._pytree import tree_map

FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CAST_MARK = "_pbe_frozen_dtype"  # set on each cast part: casting twice changes nothing


class FrozenDtype(L.Callback):
    def __init__(self, dtype: str = "bf16") -> None:
        frozen_dtype(dtype)  # an unknown name fails when the callbacks are built
        self.dtype = dtype

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        cast_frozen(pl_module, self.dtype)


def frozen_dtype(name: str) -> torch.dtype:
    """``bf16`` -> ``torch.bfloat16``; an unknown name fails naming the choices."""
    if name not in FROZEN_DTYPES:
        raise ValueError(
            f"frozen dtype {name!r} is unknown: use one of {', '.join(FROZEN_DTYPES)} "
            "(e.g. callbacks.frozen_dtype.dtype=bf16)"
        )
    return FROZEN_DTYPES[name]


def frozen_parts(module: nn.Module) -> list[nn.Module]:
    """The frozen parts of a PaintByExampleModule at the boundaries where tensors enter them:
    the VAE's encoder, decoder and (post-)quantisation convolutions, and the CLIP tower."""
    vae = module.vae
    parts = [vae.encoder, vae.decoder, module.encoder.vision]
    parts += [getattr(vae, name) for name in ("quant_conv", "post_quant_conv")]
    return [part for part in parts if part is not None]


def cast_frozen(module: nn.Module, name: str) -> None:
    """Store the frozen parts of ``module`` in dtype ``name`` (fp32 leaves them as they are)."""
    dtype = frozen_dtype(name)
    if dtype == torch.float32:
        return
    for part in frozen_parts(module):
        if getattr(part, _CAST_MARK, None) == dtype:
            continue
        _cast_tensors(part, dtype)
        part.register_forward_pre_hook(_inputs_to(dtype))
        part.register_forward_hook(_outputs_to_float32)
        setattr(part, _CAST_MARK, dtype)


def _cast_tensors(part: nn.Module, dtype: torch.dtype) -> None:
    # Parameter.data in place, not part.to(dtype): the parameters stay the same objects (and
    # this also works on the fake tensors the memory planner builds).
    for param in part.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    for owner in part.modules():
        for key, buffer in owner._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                owner._buffers[key] = buffer.to(dtype)


def _inputs_to(dtype: torch.dtype):
    def hook(_part: nn.Module, args: tuple) -> tuple:
        return tree_map(lambda x: _to_if_float(x, dtype), args)

    return hook


def _outputs_to_float32(_part: nn.Module, _args: tuple, output):
    return tree_map(lambda x: _to_if_float(x, torch.float32), output)


def _to_if_float(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value
