#!/usr/bin/env bash
# The committed CPU results, every file in benchmarks/results/, then the README block.
#
#   bash benchmarks/run_cpu.sh                      # everything (~3.5 h on 2 quiet cores)
#   bash benchmarks/run_cpu.sh table4 report        # only some parts: table4 sweep throughput loaders scaling dc mtt
#                                                   # demo study table5 table2 report
#   PY=/path/to/python bash benchmarks/run_cpu.sh
#
# Run on an idle machine: every result records the load average before and after and warns when it exceeded
# the cores, but CPU timings of processes sharing cores measure the contention, not the code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GX="$PY -m guardx"
PARTS=${*:-table4 sweep throughput loaders scaling dc mtt demo study table5 table2 report}
uptime

for part in $PARTS; do
  case $part in
  table4)  # Table 4 at 64 px (224 px would take hours on 2 cores): ResNet-18, batch 32, every method round-robin
    # 30 rounds: a shared VM's speed drifts by ±20 % within minutes; many rounds steady the medians
    $GX bench overhead --device cpu --model resnet18 --batch-size 32 --resolution 64 --rounds 30 --warmup 2 ;;
  sweep)  # cost growth, CPU-sized grid, the main methods
    $GX bench sweep --device cpu --model resnet18 --batch-sizes 8,16,32 --resolutions 32,64 --rounds 5 --warmup 1 \
        --methods plain,guard_lossdiff,guard_exact,gradnorm,adv,ref_adv_official ;;
  throughput)  # the built-in tiny demo settings (every part, end-to-end included), then the demo config's parts
    $GX bench throughput --device cpu --iters 10 --repeats 3
    $GX bench throughput --device cpu --config configs/demo.yaml --what squeeze,recover,loader --iters 5 \
        --name throughput-cpu-demo ;;
  loaders)  # 2,560 generated ImageNet-sized JPEGs; needs the ffcv and dali extras
    $GX bench loaders --device cpu ;;
  scaling)  # one core per rank, 1 and 2 ranks
    $GX bench squeeze-scaling --device cpu --ranks 1,2 --backends ddp,zero2
    $GX bench recover-scaling --device cpu --ranks 1,2 ;;
  dc)  # DC vs GUARD(DC), vectorised vs per-class, one thread, ipc 1 and 10
    $PY -m guardx.bench.dc --device cpu --threads 1 --width 32 --ipc 1 --outer-loop 1 --batch-real 64 --repeats 3
    $PY -m guardx.bench.dc --device cpu --threads 1 --width 32 --ipc 10 --outer-loop 2 --batch-real 64 --repeats 3 ;;
  mtt)  # MTT vs TESLA peak memory over the synthetic steps N
    $PY -m guardx.bench.mtt_memory --device cpu ;;
  demo|study|table5|table2)  # a fresh pipeline run, timed, its report recorded as benchmarks/results/<name>.*
    config=$(case $part in demo) echo demo;; study) echo digits-study;; *) echo $part-digits;; esac)
    rm -rf runs/$part-cpu-bench  # a fresh run: the pipeline would reuse finished stages
    start=$(date +%s.%N)
    $GX pipeline --config configs/$config.yaml run.out_dir=runs/$part-cpu-bench
    wall=$(python3 -c "import time; print(time.time() - $start)")
    $PY scripts/record_run.py runs/$part-cpu-bench $config-cpu --wall "$wall" \
        --command "python -m guardx pipeline --config configs/$config.yaml" ;;
  report)
    $GX bench report ;;
  *) echo "unknown part '$part' (table4 sweep throughput loaders scaling dc mtt demo study table5 table2 report)" >&2; exit 2 ;;
  esac
done
uptime
