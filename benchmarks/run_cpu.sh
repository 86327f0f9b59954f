#!/usr/bin/env bash
# The committed CPU runs (reduced resolution, stated in every result). ~30-40 min on 2 quiet cores.
# Run on an idle machine: CPU timings of several processes sharing cores are meaningless.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GX="$PY -m guardx"

# Table 4 layout at 64 px (224 px would take hours on 2 cores): ResNet-18, batch 32, 5 repeats.
$GX bench overhead --device cpu --model resnet18 --batch-size 32 --resolution 64 --repeats 5 --iters 3 --warmup 2

# Cost growth, CPU-sized grid.
$GX bench sweep --device cpu --model resnet18 --batch-sizes 8,16,32 --resolutions 32,64 --repeats 3 --iters 2 \
    --warmup 1

# Stage throughput: the built-in tiny demo settings (every part, end-to-end included) ...
$GX bench throughput --device cpu --iters 10 --repeats 3
# ... and the demo config's squeeze / recover / loader (without its 10-minute end-to-end run).
$GX bench throughput --device cpu --config configs/demo.yaml --what squeeze,recover,loader --iters 5 \
    --name throughput-cpu-demo

$GX bench report
