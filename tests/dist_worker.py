"""Run several squeeze configurations in one torchrun launch (one process-group start for all of them).

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py runs.json

``runs.json`` is a list of override lists, each a full ``guardx squeeze`` configuration, or of
``{"overrides": [...], "error_file": PATH}``: a run expected to fail, whose GuardxError (raised on every
rank alike) is written to ``PATH.<rank>`` before the next run starts. Used by tests/test_distributed.py
and tests/test_faults.py; every run goes through the same ``guardx.squeeze.run`` the CLI calls.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from guardx import squeeze
from guardx.config import load_config
from guardx.distributed import finalize
from guardx.errors import GuardxError


def main(spec: str) -> int:
    try:
        for run in json.loads(Path(spec).read_text()):
            if isinstance(run, list):
                squeeze.run(load_config(None, run))
                continue
            try:
                squeeze.run(load_config(None, run["overrides"]))
            except GuardxError as e:
                Path(f"{run['error_file']}.{os.environ.get('RANK', '0')}").write_text(str(e))
    finally:
        finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
