"""Benchmark: the default run, cold and then cached, side by side (a benchmark, not a test).

Prints wall time, per-stage seconds (from report.json) and peak memory (the largest resident set of
any process of the run: the flow, the Prefect API server, the model builder), and writes the
figures to bench/results/default_run.json.

Run as:
    .venv/bin/python bench/bench_default_run.py [--set key=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(out: Path, overrides: list[str], extra: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cmd = [sys.executable, "-m", "slmflow.cli", "run", "--set", f"output_dir={out}", *extra]
    for o in overrides:
        cmd += ["--set", o]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1: quality gate failed, the figures still count
        sys.exit(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = json.loads((out / "report.json").read_text())
    return {
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(peak_kb / 1024, 0) if peak_kb > before else None,
        "stages": {k: v["seconds"] for k, v in report["stages"].items()},
        "cached": {k: v["cached"] for k, v in report["stages"].items()},
        "accuracy": {k: round(v["accuracy"], 4) for k, v in report["models"].items()},
        "exit": proc.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-prefect", action="store_true")
    parser.add_argument("--out", default=None, help="run folder (default: a fresh temp folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="slmflow-bench-"))
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--no-prefect"] if args.no_prefect else []
    cold = run_once(out, args.overrides, extra)
    cached = run_once(out, args.overrides, extra)
    print(f"{'':22}{'cold':>10}{'cached':>10}")
    print(f"{'wall seconds':22}{cold['wall_seconds']:>10}{cached['wall_seconds']:>10}")
    for stage in cold["stages"]:
        print(f"  {stage:20}{cold['stages'][stage]:>10.1f}{cached['stages'][stage]:>10.2f}"
              f"  {'cached' if cached['cached'][stage] else 'RERAN'}")
    print(f"{'peak RSS MB':22}{cold['peak_rss_mb']!s:>10}{'-':>10}")
    print(f"cached / cold wall time: {cached['wall_seconds'] / cold['wall_seconds']:.1%}")
    print(f"accuracy: {cold['accuracy']}")
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "default_run.json").write_text(json.dumps({"cold": cold, "cached": cached}, indent=2))


if __name__ == "__main__":
    main()
