"""Peak dense throughput and memory of common training GPUs, from the vendors' datasheets.

Dense means without 2:4 structured sparsity (datasheets print the sparse figure, twice these,
with an asterisk). ``bf16`` is tensor-core BF16 with FP32 accumulation (what autocast's
matmuls use); ``tf32`` tensor-core TF32; ``fp32`` the plain CUDA-core rate. ``memory_gib`` is
what the card reports to CUDA (24 GB datacenter cards with ECC on show about 22.5 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16_tflops: float
    tf32_tflops: float
    fp32_tflops: float
    source: str


GPUS = (
    Gpu("A100 80GB SXM", 80.0, 312.0, 156.0, 19.5, "NVIDIA A100 datasheet"),
    Gpu("A100 40GB", 40.0, 312.0, 156.0, 19.5, "NVIDIA A100 datasheet"),
    Gpu("H100 SXM", 79.6, 989.4, 494.7, 66.9, "NVIDIA H100 datasheet"),
    Gpu("H100 PCIe", 79.6, 756.0, 378.0, 51.2, "NVIDIA H100 datasheet"),
    Gpu("H200 SXM", 140.4, 989.4, 494.7, 66.9, "NVIDIA H200 datasheet (H100 SXM compute)"),
    Gpu("L40S", 45.0, 362.0, 183.0, 91.6, "NVIDIA L40S datasheet"),
    Gpu("RTX 4090", 24.0, 165.2, 82.6, 82.6, "NVIDIA Ada architecture whitepaper"),
    Gpu("RTX 3090", 24.0, 71.0, 35.6, 35.6, "NVIDIA Ampere GA102 whitepaper"),
    Gpu("L4", 22.5, 121.0, 60.0, 30.3, "NVIDIA L4 datasheet"),
    Gpu("A10 / A10G", 22.5, 125.0, 62.5, 31.2, "NVIDIA A10 datasheet (AWS's A10G: no datasheet)"),
)

