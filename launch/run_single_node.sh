#!/usr/bin/env bash
# One node, one process per GPU (torchrun, standalone rendezvous on a free local port).
#
#   launch/run_single_node.sh squeeze --config configs/imagenet1k.yaml data.train_dir=/data/imagenet/train
#   NGPU=4 BACKEND=deepspeed ZERO=1 PRECISION=bf16 launch/run_single_node.sh squeeze --config configs/imagenet1k.yaml
#   DRY_RUN=1 launch/run_single_node.sh train --config configs/demo.yaml      # print the torchrun command
#
# NGPU defaults to the GPUs nvidia-smi lists (1 without a GPU). Other knobs: see launch/_common.sh.
# The global batch (squeeze.batch_size) stays the same whatever NGPU is: each rank takes its share.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

if [ $# -lt 1 ]; then
    echo "usage: [NGPU=N] [BACKEND=ddp|deepspeed] $0 <guardx command> [--config FILE] [section.key=value ...]" >&2
    exit 2
fi
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
if [ "${NGPU:-0}" -lt 1 ]; then NGPU=1; fi

run_or_print "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" \
    -m guardx "$@" "${DIST_OVERRIDES[@]}"
