"""FLOPs of the planned training step, counted by torch's ``FlopCounterMode`` on the same
fake step the memory plan runs (matmuls, convolutions and attention: what tensor cores do).

The frozen VAE encode and CLIP forward count: they run every step. With gradient
checkpointing the backward count includes the recomputed forwards (executed FLOPs, what the
GPU spends its time on). Convolutions are counted apart: in ``32-true`` cuDNN runs them in
TF32 (torch's default ``torch.backends.cudnn.allow_tf32``), while matmuls and attention stay
in FP32 (``torch.backends.cuda.matmul.allow_tf32`` is off by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

CONVOLUTIONS = ("convolution", "_convolution", "cudnn_convolution", "convolution_backward")


def _cpu_flash(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _fused_multi_head_attention(query, key, value, embed_dim, num_heads, *args, **kwargs) -> int:
    """nn.MultiheadAttention's inference fast path (the frozen CLIP tower outside autocast):
    input projection, attention, output projection in one op."""
    batch, length, width = query
    source = key[1]
    projections = 2 * batch * length * width * 3 * width + 2 * batch * length * width * width
    return projections + 4 * batch * length * source * width


# Kernels FlopCounterMode's registry does not list, counted with the same formulas: the CPU
# flash attention (the plan runs on fake CPU tensors) and MultiheadAttention's fast path.
EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    torch.ops.aten._native_multi_head_attention: _fused_multi_head_attention,
}


@dataclass
class StepFlops:
    """FLOPs of one training step on one device, by phase and by op.

    ``backward`` is what runs in the backward, recomputed forwards included; ``recompute``
    is that recomputation alone. Model FLOPs (what MFU divides by) leave it out.
    """

    batch_size: int
    forward: dict[str, int] = field(default_factory=dict)  # op name -> FLOPs
    backward: dict[str, int] = field(default_factory=dict)
    recompute: dict[str, int] = field(default_factory=dict)

    def executed(self, ops: tuple[str, ...] | None = None) -> int:
        return _sum(self.forward, ops) + _sum(self.backward, ops)

    def model(self, ops: tuple[str, ...] | None = None) -> int:
        return self.executed(ops) - _sum(self.recompute, ops)

    def per_sample(self, phase: str) -> float:
        """``forward``, ``backward``, ``recompute``, ``executed`` or ``model`` FLOPs / sample."""
        counts = {"executed": self.executed(), "model": self.model()}
        value = counts.get(phase) if phase in counts else _sum(getattr(self, phase), None)
        return value / self.batch_size


def _sum(counts: dict[str, int], ops: tuple[str, ...] | None) -> int:
    return sum(v for op, v in counts.items() if ops is None or op in ops)


class StepFlopCounter:
    """Counts a step's phases apart: ``forward``, ``backward`` and, inside the backward,
    ``recompute`` (the two nest: recomputed ops count in both)."""

    def __init__(self, batch_size: int) -> None:
        self.result = StepFlops(batch_size)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
        try:
            with counter:
                yield
        finally:  # a recomputation ends in checkpoint's early-stop exception: count it too
            target = getattr(self.result, name)
            for op, flops in counter.get_flop_counts().get("Global", {}).items():
                short = str(op).removeprefix("aten.").split(".")[0]
                target[short] = target.get(short, 0) + flops
