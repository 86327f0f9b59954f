"""Run DC configurations in one torchrun launch (tests/test_dc.py):

    torchrun --standalone --nproc-per-node 2 tests/dc_dist_worker.py runs.json

``runs.json`` is a list of override lists; each goes through the same ``guardx.distill.dc.run`` as one process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from guardx.config import load_config
from guardx.distill import dc
from guardx.distributed import finalize


def main(spec: str) -> int:
    try:
        for overrides in json.loads(Path(spec).read_text()):
            dc.run(load_config(None, overrides))
    finally:
        finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
