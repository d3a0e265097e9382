#!/usr/bin/env bash
# One prepared GPU check (for a session lent a device machine): CUDA paths and throughput.
#   bash bench/gpu.sh          (results also land in $OUT when the device tool sets it)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/pbe-gpu}; mkdir -p "$out"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
python -m pip install -q -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
# Training step of the real architecture (random weights): bf16, SDPA, checkpointing on / off.
python -m bench.train_throughput --batch 4 2>&1 | tee "$out/train_throughput.txt"
python -m bench.train_throughput --batch 8 --no-checkpointing 2>&1 | tee -a "$out/train_throughput.txt"
# Data path: Kornia masks/augmentation and nvjpeg decode on the GPU.
python -m bench.data_throughput --device cuda --repeats 1 2>&1 | tee "$out/data_throughput.txt"
# The demo end to end on the GPU preset (bf16-mixed), shortened.
python train.py trainer=gpu trainer.max_steps=200 hydra.run.dir="$out/demo" 2>&1 | tail -5 | tee "$out/demo.txt"
