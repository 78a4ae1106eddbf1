"""The int4 k-quant export on one thread vs on every core: seconds, peak memory, same bytes.

    python -m bench.export_parallel --model MERGED_MODEL_DIR [--threads 2] [--repeat 2]

MERGED_MODEL_DIR: a merged model (e.g. CACHE/merged_model/<key>/model of a default run). Runs the
export stage's builder command (`slmflow.stages.export.builder_command`, the default
ExportConfig: int4, k_quant, cpu) with SLMFLOW_QUANT_WORKERS=1 and =N, alternating (serial first
in each pair) so that a change of load hits both, and prints seconds (whole builder and its
k-quant alone, from builder_main's own line), peak memory of the builder's process tree, and
whether the sha256 of every output file is the same in every run. Results: bench/results/
export_parallel.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import PeakRss, load_average, table, write_result


def _export(model: Path, out: Path, threads: int) -> dict:
    from slmflow.config import ExportConfig
    from slmflow.stages.builder_main import WORKERS_ENV
    from slmflow.stages.export import builder_command

    cmd = builder_command(ExportConfig(), model, out, out.parent / "builder-cache")
    env = {**os.environ, WORKERS_ENV: str(threads), "GIT_DIR": os.devnull}
    load = load_average()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with PeakRss(proc.pid) as peak:
        _, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"builder failed ({proc.returncode}): {stderr[-2000:]}")
    spent = re.search(r"slmflow k-quant: (\d+) weights in ([\d.]+) s on (\d+) thread", stderr)
    hashes = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}
    return {"threads": threads, "seconds": round(seconds, 1),
            "k_quant_seconds": float(spent.group(2)) if spent else None,
            "weights": int(spent.group(1)) if spent else None,
            "peak_rss_mb": peak.peaks_mb()["rss"], "peak_anon_mb": peak.peaks_mb()["anon"],
            "load_before": load, "load_after": load_average(), "sha256": hashes}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.export_parallel")
    parser.add_argument("--model", type=Path, required=True, help="a merged model folder")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeat", type=int, default=2, help="serial/parallel pairs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="export-bench-", dir=args.work))
    runs = []
    try:
        for i in range(args.repeat):
            for threads in (1, args.threads):
                out = work / f"{i}-{threads}" / "model"
                out.parent.mkdir(parents=True)
                runs.append(_export(args.model.resolve(), out, threads))
                shutil.rmtree(out.parent)
                r = runs[-1]
                print(f"pair {i + 1}, {threads} thread(s): {r['seconds']} s (k-quant "
                      f"{r['k_quant_seconds']} s), load {r['load_before'][0]} -> {r['load_after'][0]}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = all(r["sha256"] == runs[0]["sha256"] for r in runs)
    rows = []
    for i in range(args.repeat):
        serial, parallel = runs[2 * i], runs[2 * i + 1]
        rows.append([f"pair {i + 1}", serial["seconds"], parallel["seconds"],
                     round(serial["seconds"] / parallel["seconds"], 2),
                     serial["k_quant_seconds"], parallel["k_quant_seconds"],
                     round(serial["k_quant_seconds"] / parallel["k_quant_seconds"], 2)
                     if serial["k_quant_seconds"] and parallel["k_quant_seconds"] else "-",
                     serial["peak_anon_mb"], parallel["peak_anon_mb"],
                     f"{serial['load_before'][0]}/{parallel['load_before'][0]}"])
    print(table(["", "export s, 1 thread", f"{args.threads} threads", "ratio",
                 "k-quant s, 1", f"{args.threads}", "ratio", "peak anon MB, 1", f"{args.threads}",
                 "load 1 min"], rows))
    print(f"sha256 of every output file equal in all {len(runs)} runs: {same} "
          f"({len(runs[0]['sha256'])} files)")
    for name, digest in runs[0]["sha256"].items():
        print(f"  {digest}  {name}")
    path = write_result("export_parallel", {"model": str(args.model),
                                             "runs": runs, "same_bytes": same})
    print(f"results: {path}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
