#!/usr/bin/env bash
# Several nodes: run this once on every node (same arguments except --node-rank).
#
#   # node 0 (its address is the rendezvous endpoint), then nodes 1..N-1:
#   launch/run_multi_node.sh --nnodes 4 --node-rank 0 --rdzv-endpoint node001:29500 \
#       squeeze --config configs/imagenet1k.yaml data.train_dir=/data/imagenet/train
#
# Options (before the guardx command):
#   --nnodes N              nodes in the job
#   --node-rank R           0..N-1; node 0 hosts the c10d rendezvous store at the endpoint
#   --rdzv-endpoint H:P     node 0's address and a free port, the same on every node
#   --nproc-per-node G      processes (GPUs) per node; default: the GPUs nvidia-smi lists
#   --rdzv-id ID            job id shared by all nodes (default: guardx)
# Environment knobs (BACKEND, ZERO, PRECISION, ...): see launch/_common.sh.
#
# Global ranks are assigned by the c10d rendezvous (torchrun ignores --node-rank for it), so the script
# uses the node rank only to decide which node hosts the rendezvous store. A node that dies ends the
# job on every node (torchrun on its node reports it; the others fail their next collective at once).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NNODES="" NODE_RANK="" ENDPOINT="" NPROC="" RDZV_ID=guardx
while [ $# -gt 0 ]; do
    case "$1" in
        --nnodes) NNODES=$2; shift 2 ;;
        --node-rank) NODE_RANK=$2; shift 2 ;;
        --rdzv-endpoint|--master) ENDPOINT=$2; shift 2 ;;
        --nproc-per-node) NPROC=$2; shift 2 ;;
        --rdzv-id) RDZV_ID=$2; shift 2 ;;
        --*) echo "$0: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ -z "$NNODES" ] || [ -z "$NODE_RANK" ] || [ -z "$ENDPOINT" ] || [ $# -lt 1 ]; then
    echo "usage: $0 --nnodes N --node-rank R --rdzv-endpoint HOST:PORT [--nproc-per-node G]" \
         "<guardx command> [--config FILE] [section.key=value ...]" >&2
    exit 2
fi
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
if [ "${NPROC:-0}" -lt 1 ]; then NPROC=1; fi
IS_HOST=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)

run_or_print "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$ENDPOINT" --rdzv-id "$RDZV_ID" --rdzv-conf "is_host=$IS_HOST" \
    --max-restarts 0 -m guardx "$@" "${DIST_OVERRIDES[@]}"
