"""Run ``guardx buffers`` configurations in one torchrun launch (tests/test_buffers.py).

    torchrun --standalone --nproc-per-node 2 tests/mtt_worker.py runs.json

``runs.json`` is a list of override lists, each a full configuration for ``guardx.distill.buffers.run``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from guardx.config import load_config
from guardx.distill import buffers
from guardx.distributed import finalize


def main(spec: str) -> int:
    try:
        for overrides in json.loads(Path(spec).read_text()):
            buffers.run(load_config(None, overrides))
    finally:
        finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
