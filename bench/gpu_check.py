"""GPU check: QLoRA on a Phi-3-mini-shaped model at 1 GPU and at every visible GPU, CUDA int4
export and CUDA evaluation; tokens/s and peak GPU memory, side by side.

The model has Phi-3-mini-4k's real widths and all 32 layers, with random weights (nothing can be
downloaded on the GPU machines this project is lent), so its accuracy means nothing; what the
check shows is that the CUDA paths run (bitsandbytes 4-bit on CUDA with bf16 compute, DDP over
nccl, the builder's CUDA int4 export, onnxruntime-genai on CUDA) and how fast. Sized for under
10 minutes on one H200. Needs torch with CUDA, bitsandbytes' CUDA kernels and
onnxruntime-genai-cuda (the CPU wheel cannot run a CUDA model).

Run as:
    .venv/bin/python -m bench.gpu_check [--layers 32] [--steps 30] [--out runs/gpu-check]
    .venv/bin/python -m bench.gpu_check --plan     # the runs it would make (no GPU needed)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, load_average, table, write_result

CONFIG = "configs/phi3-mini_qlora_cuda.yaml"


def plan(out: Path, model: Path, steps: int, gpus: int) -> list[tuple[str, list[str]]]:
    """(name, `slmflow run` overrides) of each run: 1 GPU, then every visible GPU if more."""
    common = [f"model.name_or_path={model}", f"cache_dir={out / 'cache'}",
              f"finetune.max_steps={steps}", "finetune.checkpoint_every=1000",
              "evaluate.limit=64", "evaluate.max_accuracy_drop=1.0"]  # random weights: no gate
    runs = [("1 GPU", [*common, f"output_dir={out / 'gpus-1'}",
                       "finetune.distributed.processes_per_node=1"])]
    if gpus > 1:
        runs.append((f"{gpus} GPUs", [*common, f"output_dir={out / f'gpus-{gpus}'}",
                                      f"finetune.distributed.processes_per_node={gpus}"]))
    return runs


def run(name: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "slmflow.cli", "run", "--no-prefect", "--config", CONFIG]
    for o in overrides:
        cmd += ["--set", o]
    before, t0 = load_average(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    report = json.loads(Path(proc.stdout.strip().splitlines()[-1].removeprefix("report: ")).read_text())
    training, stages = report["training"], report["stages"]
    return {"name": name, "wall_seconds": round(wall, 1), "load_before": before,
            "world_size": training["world_size"], "global_batch": training["global_batch"],
            "train_seconds": training["train_seconds"],
            "tokens_per_second": training["tokens_per_second"],
            "peak_gpu_memory_mb": training.get("peak_gpu_memory_mb"),
            "export_seconds": stages["export"]["seconds"],
            "export_cached": stages["export"]["cached"],
            "eval_examples_per_second": report["models"]["exported"]["examples_per_second"],
            "exported_mb": round(report["models"]["exported"]["size_bytes"] / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="runs/gpu-check")
    parser.add_argument("--plan", action="store_true", help="print the runs; need no GPU")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    model = out / f"phi3-mini-shaped-{args.layers}l"
    if args.plan:
        from slmflow.configio import load_config

        for name, overrides in plan(out, model, args.steps, gpus=2):
            load_config(REPO / CONFIG, overrides)  # each run's config is valid
            print(f"{name}: slmflow run --no-prefect --config {CONFIG} "
                  + " ".join(f"--set {o}" for o in overrides))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible: this check runs on a GPU machine (--plan shows it)")
    from slmflow.tiny import build_tiny_phi3

    t0 = time.perf_counter()
    build_tiny_phi3(model, seed=0, shape="phi3-mini", layers=args.layers)
    print(f"model: Phi-3-mini widths, {args.layers} layers, built in {time.perf_counter() - t0:.0f} s")
    results = [run(name, o) for name, o in plan(out, model, args.steps, torch.cuda.device_count())]
    print(table(["run", "world", "global batch", "train s", "tokens/s", "peak GPU MB", "export s",
                 "eval ex/s", "int4 MB", "wall s"],
                [[r["name"], r["world_size"], r["global_batch"], r["train_seconds"],
                  r["tokens_per_second"], r["peak_gpu_memory_mb"],
                  "cached" if r["export_cached"] else r["export_seconds"],
                  r["eval_examples_per_second"], r["exported_mb"], r["wall_seconds"]]
                 for r in results]))
    write_result("gpu_check", {"gpu": torch.cuda.get_device_name(0),
                               "gpus": torch.cuda.device_count(), "layers": args.layers,
                               "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
