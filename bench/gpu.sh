#!/usr/bin/env bash
# One prepared GPU check (for a session lent a device machine), ~12.5 min at most: most
# important first, each part with its own time limit so one slow part cannot eat the rest.
#   bash bench/gpu.sh                    (results also land in $OUT when the device tool sets it)
#   bash bench/gpu.sh memory_plan resume (only these parts: fits a 10-minute command limit)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/pbe-gpu}; mkdir -p "$out"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 PBE_CACHE_DIR=$out/cache
python -m pip install -q -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
only=" $* "
part() {  # part NAME SECONDS COMMAND...: run, keep its output, never stop the script
  local name=$1 limit=$2; shift 2
  [[ $only == "  " || $only == *" $name "* ]] || return 0
  echo "== $name"; timeout "$limit" "$@" > "$out/$name.txt" 2>&1; echo "   rc $?"
  tail -4 "$out/$name.txt"
}
# Host-device syncs between logging steps, counted by CUDA's sync debug mode (target: 0).
part sync_check 60 python -m bench.sync_check
# Lightning + our callbacks vs a bare loop, same modules and batches (target: <= 5 %).
part step_overhead 80 python -m bench.step_overhead --device cuda --rounds 5
# Masks + augmentation per batch of 16 at 512 px: Kornia's op-by-op chain vs one warp.
part device_transform 45 python -m bench.device_transform --device cuda
# Training step of the real architecture (random weights): bf16, SDPA, checkpointing on / off.
part train_throughput 90 python -m bench.train_throughput --device cuda --batch 4
# Memory plan vs measurement, the paper's architecture with random weights on one GPU: the plan
# (python -m pbe_lightning.plan, made on the CPU) against torch.cuda.max_memory_allocated over
# 3 Lightning steps; the recipe (fp32), then memory=24gb (bf16, checkpointing, frozen VAE/CLIP
# in bf16, 8-bit AdamW: torch's AdamW where bitsandbytes is missing). Lines: planned/measured.
adamw=$(python -c "import bitsandbytes" 2>/dev/null || echo model.optimizer._target_=torch.optim.AdamW)
part memory_plan 300 bash -c "python -m bench.memory_plan --device cuda --weights random \
  experiment=paper trainer=gpu; python -m bench.memory_plan --device cuda --weights random \
  experiment=paper trainer=gpu memory=24gb trainer.accumulate_grad_batches=1 $adamw"
# evaluate.py's painting of SD-size models: seconds per edit per precision (fp16, the paper's;
# bf16; fp32), with and without channels-last (10 PLMS steps; COCOEE's 50 take ~5x as long).
part eval_throughput 60 python -m bench.eval_throughput --arch sd15 --device cuda \
  --resolution 512 --steps 10 --batch 8 --threads 0 --rounds 2
# Data path: Kornia masks/augmentation and nvjpeg decode on the GPU.
part data_throughput 60 python -m bench.data_throughput --device cuda --repeats 1
# Resume without replay: CPU-bound, but this machine has 16 cores to spare.
part resume 60 python -m bench.resume --rounds 3
