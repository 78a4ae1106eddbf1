"""Benchmark: the exported int4 model (onnxruntime-genai) vs the merged model (PyTorch fp32).

On the eval split of a finished run, with the evaluate stage's own generators: examples per
second, p50/p95 latency per example (the time it waited for its batch) and size on disk, one row
at a time (batch 1, how evaluation ran before) and in equal-length batches (how it runs now).
Answers of every batch size are compared row by row with batch 1's: they must be the same.

Run as (after a default run, e.g. `slmflow run --no-prefect`):
    .venv/bin/python -m bench.inference [--run runs/default] [--batch-sizes 1,16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import REPO, dir_size, load_average, table, write_result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bench_model(name: str, ref, rows, labels, batch_sizes, max_new_tokens: int) -> list[dict]:
    from slmflow.generate import generate_answers, load_backend
    from slmflow.stages.evaluate import parse_answer

    t0 = time.perf_counter()
    backend = load_backend(ref)
    generate, tokenizer, folder = backend.generate, backend.tokenizer, backend.folder
    load_seconds = time.perf_counter() - t0
    longest = max(len(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels)
    max_new = min(max_new_tokens, longest + 1)
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    generate([prompts[0]], max_new)  # warm-up
    size = dir_size(folder)
    out, reference = [], None
    for bs in batch_sizes:
        start = time.perf_counter()
        new, waited = generate_answers(generate, prompts, max_new, bs)
        seconds = time.perf_counter() - start
        answers = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
        preds = [parse_answer(a, labels) for a in answers]
        if reference is None:
            reference = answers
        out.append({
            "model": name,
            "batch_size": bs,
            "seconds": round(seconds, 2),
            "examples_per_second": round(len(rows) / seconds, 1),
            "latency_ms_p50": round(1000 * percentile(waited, 0.5), 1),
            "latency_ms_p95": round(1000 * percentile(waited, 0.95), 1),
            "accuracy": round(sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows), 4),
            "answers_differ_from_batch_1": sum(a != b for a, b in zip(answers, reference)),
            "size_mb": round(size / 1e6, 1),
            "load_seconds": round(load_seconds, 2),
            "answers": answers,
            "load_average": load_average(),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/default", help="a finished run's output_dir")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--models", default="merged,exported")
    args = parser.parse_args()
    from slmflow.artifacts import ArtifactRef
    from slmflow.folders import read_split

    run = Path(args.run) if Path(args.run).is_absolute() else REPO / args.run
    report = json.loads((run / "report.json").read_text())
    stages = report["stages"]
    labels = report["config"]["data"]["labels"]
    max_new_tokens = report["config"]["evaluate"]["max_new_tokens"]

    def ref(stage: str, kind: str) -> ArtifactRef:
        uri = stages[stage]["uri"]
        meta = json.loads((Path(uri) / "slmflow-artifact.json").read_text()).get("meta", {})
        return ArtifactRef(kind=kind, uri=uri, sha256=stages[stage]["sha256"],
                           key=stages[stage]["key"], meta=meta)

    data = ref("prepare_data", "dataset")
    rows = read_split(data, "eval")
    models = {"merged": ("merge", "merged_model"), "exported": ("export", "onnx_model"),
              "base": ("base_model", "base_model")}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    before = load_average()
    results = []
    for name in args.models.split(","):
        stage, kind = models[name]
        label = {"merged": "merged fp32 (PyTorch)", "exported": "exported int4 (onnxruntime-genai)",
                 "base": "base fp32 (PyTorch)"}[name]
        results += bench_model(label, ref(stage, kind), rows, labels, batch_sizes, max_new_tokens)
    print(f"inference on {len(rows)} eval rows of {run} (load average before {before}, "
          f"after {load_average()})")
    cols = ["batch_size", "examples_per_second", "latency_ms_p50", "latency_ms_p95", "accuracy",
            "answers_differ_from_batch_1", "size_mb"]
    print(table(["model", "batch", "ex/s", "p50 ms", "p95 ms", "accuracy", "answers != b1", "MB"],
                [[r["model"], *[r[c] for c in cols]] for r in results]))
    write_result("inference", {"run": str(run), "rows": len(rows), "load_average_before": before,
                               "results": results})


if __name__ == "__main__":
    main()
