"""Benchmark: the default run, cold and then cached, side by side (a benchmark, not a test).

Prints wall time, per-stage seconds (from report.json), peak memory per stage and for the whole
run (the largest resident set of the run's process tree at one moment: the flow, the Prefect API
server, the model builder), and the time to accuracy: when the exported int4 model's evaluation
ended with accuracy >= 0.90 (seconds from the start of `slmflow run`). Stage boundaries come from
the run's own log lines, read as they are written. Writes bench/results/default_run.json.

Run as:
    .venv/bin/python -m bench.default_run [--no-prefect] [--set key=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import REPO, PeakRss, load_average, table, write_result

TARGET = 0.90
# A stage ends: "[label] done: ..." (plain) or "Task run 'label' - Finished in state ..." (Prefect).
STAGE_END = re.compile(r"^\[(\w+)\] (?:done|cached): |Task run '(\w+)' - Finished in state")


class TimedSampler(PeakRss):
    """PeakRss that also keeps every (time, {rss, anon}) sample."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(pid, interval)
        self.samples: list[tuple[float, dict[str, int]]] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self.sample()
            self.samples.append((time.perf_counter(), sample))
            self._update(sample)
            self._stop.wait(self.interval)


def run_once(out: Path, overrides: list[str], extra: list[str], env: dict | None = None,
             wrap: Callable[[list[str]], list[str]] | None = None, check: bool = True) -> dict:
    """One `slmflow run` in a subprocess: wall time, peak memory (whole run and per stage).

    `wrap` turns the command into the one started (e.g. inside a memory cgroup); with
    `check=False` a failed run is reported (its exit, time and memory) instead of ending here.
    """
    cmd = [sys.executable, "-m", "slmflow.cli", "run", "--set", f"output_dir={out}", *extra]
    for o in overrides:
        cmd += ["--set", o]
    if wrap:
        cmd = wrap(cmd)
    before = load_average()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, env=env)
    ends: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = STAGE_END.search(line)
            if m:
                ends.setdefault(m.group(1) or m.group(2), time.perf_counter())

    reader = threading.Thread(target=read, daemon=True)
    with TimedSampler(proc.pid) as mem:
        reader.start()
        code = proc.wait()
        reader.join()
    wall = time.perf_counter() - start
    if code not in (0, 1):  # 1: quality gate failed, the figures still count
        if check:
            sys.exit(f"run failed ({code}):\n{''.join(lines)[-4000:]}")
        print(f"run failed ({code}):\n{''.join(lines)[-2000:]}")
        return {"exit": code, "wall_seconds": round(wall, 1), "peak_mb": mem.peaks_mb(),
                "stages": {}, "accuracy": {}, "load_average_before": before,
                "load_average_after": load_average()}
    import json

    report = json.loads((out / "report.json").read_text())
    stage_peak: dict[str, dict[str, int | None]] = {kind: {} for kind in PeakRss.KINDS}
    prev = start
    for label in report["stages"]:
        end = ends.get(label)
        if end is None:
            continue
        window = [b for t, b in mem.samples if prev <= t <= end]
        for kind in PeakRss.KINDS:
            stage_peak[kind][label] = round(max(b[kind] for b in window) / 2**20) if window else None
        prev = end
    accuracy = {k: round(v["accuracy"], 4) for k, v in report["models"].items()}
    reached = accuracy.get("exported", 0) >= TARGET and "evaluate_exported" in ends
    return {
        "wall_seconds": round(wall, 1),
        "peak_mb": mem.peaks_mb(),  # rss, anon: see PeakRss
        "stages": {k: v["seconds"] for k, v in report["stages"].items()},
        "cached": {k: v["cached"] for k, v in report["stages"].items()},
        "stage_peak_mb": stage_peak,
        "accuracy": accuracy,
        "time_to_accuracy_seconds": round(ends["evaluate_exported"] - start, 1) if reached else None,
        "load_average_before": before,
        "load_average_after": load_average(),
        "exit": code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-prefect", action="store_true")
    parser.add_argument("--out", default=None, help="run folder (default: a fresh temp folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="slmflow-bench-"))
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--no-prefect"] if args.no_prefect else []
    cold = run_once(out, args.overrides, extra)
    cached = run_once(out, args.overrides, extra)
    rows = [["wall seconds", cold["wall_seconds"], cached["wall_seconds"], None, None, None]]
    for stage in cold["stages"]:
        rows.append([f"  {stage}", cold["stages"][stage], cached["stages"][stage],
                     "cached" if cached["cached"][stage] else "RERAN",
                     cold["stage_peak_mb"]["rss"].get(stage), cold["stage_peak_mb"]["anon"].get(stage)])
    for kind in PeakRss.KINDS:
        rows.append([f"peak {kind.upper()} MB (tree)", cold["peak_mb"][kind], cached["peak_mb"][kind],
                     None, None, None])
    mode = "plain" if args.no_prefect else "Prefect"
    print(f"default run ({mode}), load average {cold['load_average_before']} before cold, "
          f"{cached['load_average_after']} after cached")
    print(table(["", "cold s", "cached s", "rerun", "cold RSS MB", "anon"], rows))
    print(f"cached / cold wall time: {cached['wall_seconds'] / cold['wall_seconds']:.1%}")
    print(f"accuracy: {cold['accuracy']}")
    tta = cold["time_to_accuracy_seconds"]
    print(f"time to exported int4 accuracy >= {TARGET}: " + (f"{tta} s" if tta else "not reached"))
    write_result("default_run" + ("_plain" if args.no_prefect else ""),
                 {"mode": mode, "overrides": args.overrides, "cold": cold, "cached": cached})


if __name__ == "__main__":
    main()
