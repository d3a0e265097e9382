"""The plan as text: parameters by part, memory at the peak, FLOPs and throughput by GPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pbe_lightning.plan import MemoryPlan
from pbe_lightning.plan.flops import CONVOLUTIONS
from pbe_lightning.plan.gpus import GPUS, Gpu
from pbe_lightning.plan.memory import CATEGORIES

GIB = 2**30
# What a card needs beyond max_memory_allocated: the CUDA context, cuBLAS/cuDNN workspaces
# and the caching allocator's slack. About 0.5-1 GiB on recent drivers; "fits" keeps this much.
HEADROOM_GIB = 1.0
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PAPER_GLOBAL_BATCH = 32  # 8 GPUs x 4
PHASES = ("forward", "backward", "recompute", "model", "executed")


def gib(nbytes: int | float) -> str:
    return f"{nbytes / GIB:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def run_line(result: MemoryPlan) -> str:
    s = result.settings
    checkpointing = "on" if s.gradient_checkpointing else "off"
    ema = "on" if s.ema else "off"
    return (
        f"{s.device}, {s.precision}, batch {s.batch_size} at {s.resolution} px (reference "
        f"{s.reference_size} px), gradient checkpointing {checkpointing}, optimizer "
        f"{result.optimizer}, EMA {ema}, frozen VAE/CLIP {s.frozen_dtype}, strategy {s.strategy}"
    )


def parts_table(result: MemoryPlan) -> list[str]:
    rows = [
        [
            part.name,
            f"{part.parameters / 1e6:.1f} M",
            "yes" if part.trainable else "no",
            DTYPES.get(part.dtype, str(part.dtype)),
            gib(part.nbytes),
        ]
        for part in result.parts
    ]
    total = sum(part.parameters for part in result.parts)
    rows.append(["total", f"{total / 1e6:.1f} M", "", "", gib(sum(p.nbytes for p in result.parts))])
    return table(["part", "parameters", "trained", "dtype", "weights GiB"], rows)


def memory_table(result: MemoryPlan) -> list[str]:
    rows = [[name, gib(result.breakdown.get(name, 0))] for name in CATEGORIES]
    rows.append([f"**peak** ({result.peak_phase})", f"**{gib(result.peak)}**"])
    return table(["held at the peak", "GiB"], rows)


def phases_line(result: MemoryPlan) -> str:
    peaks = ", ".join(f"{phase} {gib(v)}" for phase, v in result.phase_peaks.items())
    return f"peak by phase (GiB): {peaks}"


def batch_lines(result: MemoryPlan) -> list[str]:
    s = result.settings
    per = f"{s.batch_size} per device x accumulate {s.accumulate}"
    if s.devices is not None:
        total = s.global_batch()
        return [f"global batch: {per} x {s.devices} device(s) x {s.num_nodes} node(s) = {total}"]
    counts = ", ".join(f"{n} GPU(s) {s.global_batch(n)}" for n in (1, 2, 4, 8))
    return [
        f"global batch: {per} x the node's GPUs: {counts} (the paper's is "
        f"{PAPER_GLOBAL_BATCH}: trainer.accumulate_grad_batches = "
        f"{PAPER_GLOBAL_BATCH} / ({s.batch_size} x GPUs))"
    ]


def flop_count(value: float) -> str:
    return f"{value / 1e12:.2f} T" if value >= 1e11 else f"{value / 1e9:.2f} G"


def flops_lines(result: MemoryPlan) -> list[str]:
    flops = result.flops
    if flops is None:
        return []
    per = {phase: flop_count(flops.per_sample(phase)) for phase in PHASES}
    line = (
        f"FLOPs per sample: forward {per['forward']} (the frozen VAE encode and CLIP included), "
        f"backward {per['backward']}"
    )
    if flops.recompute:
        line += f" (of which {per['recompute']} recomputation)"
    return [f"{line}; model FLOPs {per['model']} (executed {per['executed']})"]


def step_seconds(result: MemoryPlan, gpu: Gpu, mfu: float) -> float:
    """Seconds per training step when the model FLOPs run at ``mfu`` of the GPU's peak."""
    flops = result.flops
    assert flops is not None
    if result.settings.precision == "32-true":
        # Convolutions in TF32 (cuDNN's default), matmuls and attention in FP32 (torch's).
        conv = flops.model(CONVOLUTIONS)
        rest = flops.model() - conv
        return (conv / gpu.tf32_tflops + rest / gpu.fp32_tflops) / (mfu * 1e12)
    return flops.model() / (gpu.bf16_tflops * mfu * 1e12)


def gpu_table(result: MemoryPlan, mfu: float, gpus: Sequence[Gpu] = GPUS) -> list[str]:
    rows = []
    for gpu in gpus:
        fits = result.peak / GIB + HEADROOM_GIB <= gpu.memory_gib
        rate = result.settings.batch_size / step_seconds(result, gpu, mfu)
        rows.append([gpu.name, f"{gpu.memory_gib:.1f}", "yes" if fits else "no", f"{rate:.2f}"])
    header = [
        "GPU",
        "GiB",
        f"fits (peak + {HEADROOM_GIB:.0f} GiB)",
        f"samples/s per GPU at {mfu:.0%} MFU",
    ]
    return table(header, rows)


def strategy_notes(result: MemoryPlan) -> list[str]:
    if result.settings.strategy != "fsdp":
        return []
    return [
        "  trainer=fsdp: planned unsharded, an upper bound (FSDP shards the UNet's weights, "
        "gradients and optimiser state across GPUs)"
    ]


def render(result: MemoryPlan, overrides: Sequence[str], mfu: float) -> str:
    lines = [
        "pbe-lightning training plan, per device (modules built from their configs on fake "
        "tensors: no GPU, no weights read)",
        f"  overrides: {' '.join(overrides) or '(none)'}",
        *[f"  {source}" for source in result.sources],
        f"  run: {run_line(result)}",
        *strategy_notes(result),
        "",
        *parts_table(result),
        "",
        *memory_table(result),
        phases_line(result),
        *batch_lines(result),
    ]
    if result.flops is not None:
        lines += ["", *flops_lines(result), *gpu_table(result, mfu)]
        lines.append(
            "  samples/s = MFU x the GPU's peak dense rate (datasheet, no sparsity) / model FLOPs "
            "per sample; bf16 rates for mixed precision, 32-true: convolutions at TF32 "
            "(cuDNN's default), the rest FP32"
        )
    lines += ["", f"peak memory per device: {gib(result.peak)} GiB"]
    return "\n".join(lines)
