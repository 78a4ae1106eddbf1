"""Benchmark: the fine-tune stage with 1 process and with N data-parallel processes, side by side.

Both train the same number of optimizer steps on the same global batch (1 process × batch B,
N processes × batch B/N each), from the same base model and data, each into a fresh store.
Figures: the training loop's seconds and tokens/s as rank 0 measured them, the stage's wall time
(with process start-up, model loading and rendezvous), and the load average around each. On a
2-core CPU no speed-up is expected: the figure shows what the machinery costs. On a GPU machine
pass `--processes 1,8` (one per GPU).

Run as (after a default run, e.g. `slmflow run --no-prefect`, for its base model and data):
    .venv/bin/python -m bench.distributed [--run runs/default] [--steps 20] [--processes 1,2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, load_average, table, write_result


def run_ref(report: dict, stage: str, kind: str):
    from slmflow.artifacts import ArtifactRef

    entry = report["stages"][stage]
    meta = json.loads((Path(entry["uri"]) / "slmflow-artifact.json").read_text()).get("meta", {})
    return ArtifactRef(kind=kind, uri=entry["uri"], sha256=entry["sha256"], key=entry["key"],
                       meta=meta)


def measure(cfg, base, data, processes: int) -> dict:
    from slmflow.stage import run_stage
    from slmflow.stages import STAGES
    from slmflow.store import Store

    batch = cfg.batch_size * cfg.gradient_accumulation_steps
    if batch % processes:
        sys.exit(f"the global batch {batch} does not split over {processes} processes")
    run_cfg = cfg.model_copy(update={
        "batch_size": cfg.batch_size // processes,
        "distributed": cfg.distributed.model_copy(update={"processes_per_node": processes})})
    before = load_average()
    with tempfile.TemporaryDirectory(prefix="slmflow-bench-dist-") as store:
        t0 = time.perf_counter()
        ref = run_stage(STAGES["finetune"], run_cfg, Store.at(store), base=base, data=data,
                        log=lambda m: None)
        wall = time.perf_counter() - t0
    meta = ref.meta
    return {"processes": processes, "global_batch": meta["global_batch"], "steps": meta["steps"],
            "train_seconds": meta["train_seconds"], "wall_seconds": round(wall, 1),
            "tokens_per_second": meta["tokens_per_second"], "final_loss": meta["final_loss"],
            "load_before": before, "load_after": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/default", help="a finished run's output_dir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    args = parser.parse_args()

    from slmflow.config import FinetuneConfig

    run = Path(args.run) if Path(args.run).is_absolute() else REPO / args.run
    report = json.loads((run / "report.json").read_text())
    base, data = run_ref(report, "base_model", "base_model"), run_ref(report, "prepare_data", "dataset")
    cfg = FinetuneConfig(**report["config"]["finetune"]).model_copy(update={"max_steps": args.steps})
    results = [measure(cfg, base, data, int(n)) for n in args.processes.split(",")]
    first = results[0]
    print(table(["processes", "global batch", "steps", "train s", "wall s", "tokens/s",
                 "vs first", "final loss", "load before/after"],
                [[r["processes"], r["global_batch"], r["steps"], r["train_seconds"],
                  r["wall_seconds"], r["tokens_per_second"],
                  round(r["tokens_per_second"] / first["tokens_per_second"], 3),
                  round(r["final_loss"], 4), f"{r['load_before'][0]}/{r['load_after'][0]}"]
                 for r in results]))
    write_result("distributed", {"run": str(run), "results": results})


if __name__ == "__main__":
    main()
