#!/usr/bin/env bash
# Table 4 on one CUDA GPU, plus the cost-growth sweep, the kernel bandwidth, attack cost and stage throughput.
# Results land in benchmarks/results/ (JSON + markdown [+ PNG]); then the README block is regenerated.
#
#   bash benchmarks/run_table4_gpu.sh            # ~20-30 min on one H100/A100
#   PY=/path/to/python bash benchmarks/run_table4_gpu.sh
#
# Run it on an otherwise idle GPU: every number is a ratio within one run (methods round-robin in one
# process), but absolute times are only meaningful without neighbours. Every file names the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GX="$PY -m guardx"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true

# 1. Table 4: ResNet-18, batch 32, 224 px, every method, baseline and A/B row (fp32, cuDNN autotune on);
#    20 rounds of 5-step blocks, round-robin in one process; peak memory per method in its own process.
$GX bench overhead --device cuda --model resnet18 --batch-size 32 --resolution 224 --rounds 20 --iters 5 --warmup 5

# 1b. The GUARD steps with the PyTorch reference row ops instead of the Triton kernels (the kernels' step-level
#     effect), and the whole table in bf16 autocast.
$GX bench overhead --device cuda --model resnet18 --batch-size 32 --resolution 224 --rounds 20 --iters 5 \
    --warmup 5 --methods plain,guard_exact,guard_lossdiff --kernels reference \
    --name overhead-gpu-reference-kernels-resnet18-bs32-r224
$GX bench overhead --device cuda --model resnet18 --batch-size 32 --resolution 224 --rounds 20 --iters 5 \
    --warmup 5 --precision bf16 --name overhead-gpu-bf16-resnet18-bs32-r224

# 2. Cost growth over batch size x resolution (PNG + JSON + markdown). Points that do not fit are recorded as OOM.
$GX bench sweep --device cuda --model resnet18 --batch-sizes 8,16,32,64,128 --resolutions 32,64,112,224 \
    --rounds 10 --iters 3 --warmup 3 --methods plain,guard_lossdiff,guard_exact,gradnorm,adv,ref_adv_official

# 3. Triton kernels vs their PyTorch references (GB/s).
$GX bench kernels --batch 32 --resolutions 32,64,112,224 --dtypes fp32,bf16

# 4. Evaluation attacks at the paper's budgets (random weights: the worst case), and stage throughput.
$GX bench attacks --device cuda --model resnet18 --resolution 224 --batch-size 128
$GX bench throughput --device cuda --config configs/demo.yaml --what squeeze,recover,loader --iters 20 \
    --name throughput-gpu-demo

$GX bench report
