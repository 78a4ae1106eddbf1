"""Benchmark: orchestration overhead, the Prefect flow vs the same stages in one plain process.

Runs the default pipeline cold into two fresh output folders, once as `slmflow run` (the Prefect
flow, its ephemeral API server included) and once as `slmflow run --no-prefect` (the same stage
functions called in order in one Python process), then each again, all cached. Prints wall times,
the Prefect/plain ratio (goal: <= 1.10 cold) and the per-stage seconds side by side.

Run as:
    .venv/bin/python bench/bench_orchestration.py [--set key=value ...] [--order plain,prefect]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_result
from bench_default_run import run_once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--order", default="plain,prefect", help="which cold run goes first")
    parser.add_argument("--out", default=None,
                        help="keep the run folders here (OUT/plain, OUT/prefect; default: a temp "
                        "folder, removed after)")
    args = parser.parse_args()
    root = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="slmflow-bench-"))
    shutil.rmtree(root, ignore_errors=True)
    # A fresh Prefect home: the ephemeral server starts on an empty database, as on a new machine.
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    results: dict[str, dict] = {}
    order = args.order.split(",")
    for mode in order:
        results[f"{mode}_cold"] = run_once(root / mode, args.overrides, ["--no-prefect"] if mode == "plain" else [], env)
    for mode in order:
        results[f"{mode}_cached"] = run_once(root / mode, args.overrides, ["--no-prefect"] if mode == "plain" else [], env)
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)

    pc, fc = results["plain_cold"], results["prefect_cold"]
    pw, fw = results["plain_cached"], results["prefect_cached"]
    rows = [["wall seconds", pc["wall_seconds"], fc["wall_seconds"],
             round(fc["wall_seconds"] / pc["wall_seconds"], 3), pw["wall_seconds"],
             fw["wall_seconds"]]]
    for stage in pc["stages"]:
        rows.append([f"  {stage}", pc["stages"][stage], fc["stages"][stage], None,
                     pw["stages"][stage], fw["stages"][stage]])
    rows.append(["peak RSS MB (tree)", pc["peak_rss_mb"], fc["peak_rss_mb"], None,
                 pw["peak_rss_mb"], fw["peak_rss_mb"]])
    rows.append(["time to int4 >= 0.90 s", pc["time_to_accuracy_seconds"],
                 fc["time_to_accuracy_seconds"], None, None, None])
    rows += [[f"  peak MB {stage}", pc["stage_peak_rss_mb"].get(stage),
              fc["stage_peak_rss_mb"].get(stage), None, None, None] for stage in pc["stages"]]
    print(table(["", "plain cold", "Prefect cold", "ratio", "plain cached", "Prefect cached"], rows))
    ratio = fc["wall_seconds"] / pc["wall_seconds"]
    print(f"Prefect / plain, cold: {ratio:.3f} (goal <= 1.10); cached: "
          f"{fw['wall_seconds'] / pw['wall_seconds']:.2f}")
    print(f"accuracy plain {pc['accuracy']}, Prefect {fc['accuracy']}")
    print("load averages: " + ", ".join(f"{k} {v['load_average_before']}→{v['load_average_after']}"
                                          for k, v in results.items()))
    write_result("orchestration", {"overrides": args.overrides, "order": order,
                                   "prefect_over_plain_cold": round(ratio, 3), **results})


if __name__ == "__main__":
    main()
