"""Copy a finished pipeline's report into benchmarks/results/ as a committed, re-measurable record.

    python scripts/record_run.py runs/digits-study digits-study-cpu --wall 2710 \\
        --command "make study"

Writes <name>.md, <name>.json and <name>.html. The json is the run's report.json plus the command, the
wall time measured around it (start-up included; the report's total_seconds excludes it) and the device
line; everything else (environment, git revision, per-stage seconds, per-seed values) is the run's own.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("name")
    ap.add_argument("--wall", type=float, required=True, help="wall seconds of the whole command")
    ap.add_argument("--command", required=True)
    ap.add_argument("--device", default="CPU: 2 cores of an AMD EPYC (this project's dev machine, x86_64), "
                                        "24 GiB, no GPU")
    a = ap.parse_args()
    report = json.loads((a.run_dir / "report.json").read_text())
    report.update(command=a.command, wall_seconds_including_startup=a.wall, device=a.device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = (a.run_dir / "report.md").read_text().rstrip("\n")
    (RESULTS / f"{a.name}.md").write_text(f"{md}\n\nCommand: `{a.command}` · wall time {a.wall:.0f} s including "
                                          f"start-up · {a.device}\n")
    shutil.copyfile(a.run_dir / "report.html", RESULTS / f"{a.name}.html")
    print(f"wrote {RESULTS}/{a.name}.{{md,json,html}}")


if __name__ == "__main__":
    main()
