"""Benchmark: orchestration overhead, the Prefect flow vs the same stages in one plain process.

Runs the default pipeline cold into two fresh output folders, once as `slmflow run` (the Prefect
flow, its ephemeral API server included) and once as `slmflow run --no-prefect` (the same stage
functions called in order in one Python process), then each again, all cached. Prints wall times,
the Prefect/plain ratio (goal: <= 1.10 cold) and the per-stage seconds side by side.

Run as:
    .venv/bin/python -m bench.orchestration [--set key=value ...] [--order plain,prefect]
        [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.common import table, write_result
from bench.default_run import run_once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--order", default="plain,prefect", help="which cold run goes first")
    parser.add_argument("--repeat", type=int, default=1,
                        help="pairs of cold runs, the order alternating (even: balanced)")
    parser.add_argument("--out", default=None,
                        help="keep the run folders here (OUT/plain, OUT/prefect; default: a temp "
                        "folder, removed after)")
    args = parser.parse_args()
    root = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="slmflow-bench-"))
    shutil.rmtree(root, ignore_errors=True)
    order = args.order.split(",")
    pairs: list[dict[str, dict]] = []
    for i in range(args.repeat):
        # A fresh Prefect home each pair: the ephemeral server starts on an empty database, as
        # on a new machine.
        env = {**os.environ, "PREFECT_HOME": str(root / f"prefect-home{i or ''}")}
        env.pop("PREFECT_API_URL", None)
        pair_order = order if i % 2 == 0 else order[::-1]
        pair: dict[str, dict] = {}
        for mode in pair_order:
            pair[f"{mode}_cold"] = run_once(root / f"{mode}{i or ''}", args.overrides,
                                            ["--no-prefect"] if mode == "plain" else [], env)
        for mode in pair_order:
            pair[f"{mode}_cached"] = run_once(root / f"{mode}{i or ''}", args.overrides,
                                              ["--no-prefect"] if mode == "plain" else [], env)
        pair["order"] = pair_order
        pairs.append(pair)
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    results = pairs[0]
    ratios = [p["prefect_cold"]["wall_seconds"] / p["plain_cold"]["wall_seconds"] for p in pairs]

    pc, fc = results["plain_cold"], results["prefect_cold"]
    pw, fw = results["plain_cached"], results["prefect_cached"]
    rows = [["wall seconds", pc["wall_seconds"], fc["wall_seconds"],
             round(fc["wall_seconds"] / pc["wall_seconds"], 3), pw["wall_seconds"],
             fw["wall_seconds"]]]
    for stage in pc["stages"]:
        rows.append([f"  {stage}", pc["stages"][stage], fc["stages"][stage], None,
                     pw["stages"][stage], fw["stages"][stage]])
    for kind in ("rss", "anon"):
        rows.append([f"peak {kind.upper()} MB (tree)", pc["peak_mb"][kind], fc["peak_mb"][kind], None,
                     pw["peak_mb"][kind], fw["peak_mb"][kind]])
    rows.append(["  outside the stages", *[round(r["wall_seconds"] - sum(r["stages"].values()), 1)
                                            for r in (pc, fc)], None,
                 *[round(r["wall_seconds"] - sum(r["stages"].values()), 1) for r in (pw, fw)]])
    rows.append(["time to int4 >= 0.90 s", pc["time_to_accuracy_seconds"],
                 fc["time_to_accuracy_seconds"], None, None, None])
    rows += [[f"  peak RSS / anon MB {stage}",
              f'{pc["stage_peak_mb"]["rss"].get(stage)} / {pc["stage_peak_mb"]["anon"].get(stage)}',
              f'{fc["stage_peak_mb"]["rss"].get(stage)} / {fc["stage_peak_mb"]["anon"].get(stage)}',
              None, None, None] for stage in pc["stages"]]
    print(table(["", "plain cold", "Prefect cold", "ratio", "plain cached", "Prefect cached"], rows))
    for i, (p, r) in enumerate(zip(pairs, ratios, strict=True)):
        print(f"pair {i + 1} ({' then '.join(p['order'])}): plain {p['plain_cold']['wall_seconds']} s, "
              f"Prefect {p['prefect_cold']['wall_seconds']} s, ratio {r:.3f}; outside the stages: "
              + ", ".join(f"{m} {p[m + '_cold']['wall_seconds'] - sum(p[m + '_cold']['stages'].values()):.1f} s"
                          for m in ("plain", "prefect")))
    # The second cold run of a pair is often slower whichever mode it is (seen here: 12-24 s), so
    # the summary is mean Prefect over mean plain, order-balanced when --repeat is even.
    ratio = (statistics.mean(p["prefect_cold"]["wall_seconds"] for p in pairs)
             / statistics.mean(p["plain_cold"]["wall_seconds"] for p in pairs))
    print(f"Prefect / plain, cold: {ratio:.3f} (mean over {len(pairs)} pairs; goal <= 1.10); "
          f"cached: {fw['wall_seconds'] / pw['wall_seconds']:.2f}")
    print(f"accuracy plain {pc['accuracy']}, Prefect {fc['accuracy']}")
    print("load averages: " + "; ".join(
        f"pair {i + 1} {k} {v['load_average_before']}→{v['load_average_after']}"
        for i, p in enumerate(pairs) for k, v in p.items() if isinstance(v, dict)))
    write_result("orchestration", {"overrides": args.overrides, "order": order,
                                   "prefect_over_plain_cold": round(ratio, 3),
                                   "ratios": [round(r, 3) for r in ratios], **results,
                                   "pairs": pairs[1:]})


if __name__ == "__main__":
    main()
