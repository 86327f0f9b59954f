"""Run several squeeze configurations in one torchrun launch (one process-group start for all of them).

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py runs.json

``runs.json`` is a list of override lists, each a full ``guardx squeeze`` configuration. Used by
tests/test_distributed.py; every run goes through the same ``guardx.squeeze.run`` the CLI calls.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from guardx import squeeze
from guardx.config import load_config
from guardx.distributed import finalize


def main(spec: str) -> int:
    try:
        for overrides in json.loads(Path(spec).read_text()):
            squeeze.run(load_config(None, overrides))
    finally:
        finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
