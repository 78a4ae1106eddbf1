"""Cost as data grows: prepare_data and evaluate at 1x, 10x and 100x the bundled rows.

    python -m bench.scaling --base BASE_MODEL_DIR --eval-model MODEL_DIR [--scales 1 10 100]

The larger sets are made from the bundled tones data (480 rows), deterministically: copy c of row
i keeps its tone and rewrites its phrase with a neutral lead-in (LEADS[c % 10]) and a neutral
tail (TAILS[c // 10]), so all 100 copies of a row are distinct texts of the same tone (copy 0 is
the row itself); each copy is a new line of the file, so a row's id is its line. 10x: 4800 rows,
100x: 48000.

Each measurement runs in a fresh process (python -m bench.scaling --one ...): the stage's own
build function (`slmflow.stages.prepare_data.build`, `slmflow.stages.evaluate.build`, as Prefect
runs them), timed, and the peak RSS of the process above its RSS just before the call (imports
and the loaded model not counted: what the rows add). prepare_data tokenizes with BASE_MODEL_DIR's
tokenizer (the default SmolLM2's); evaluate answers the eval split (30%: 144 rows at 1x) with the
PyTorch model in MODEL_DIR (a model folder; the tiny random Phi-3 of `slmflow make-tiny-model`
fits 100x in minutes on 2 cores, SmolLM2 does not: see docs/speed.md). Prints per-row seconds and
memory side by side with 1x; writes bench/results/scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, RESULTS, load_average, table, write_result

# One thread each (torch, tokenizers): per-row cost without the noise of intra-op threads
# spinning against the other processes of a shared 2-core machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
BUNDLED = REPO / "src" / "slmflow" / "data" / "tones.jsonl"
LEADS = ["", "Honestly, ", "To be fair, ", "I have to say, ", "Well, ", "So, ", "Listen, ",
         "Believe it or not, ", "As it happens, ", "Truth be told, "]
TAILS = ["", " That is all.", " Just so you know.", " I mean it.", " Make of it what you will.",
         " No more to say.", " That is the story.", " So there it is.", " Anyway.", " Go figure."]


def rewrite(phrase: str, copy: int) -> str:
    if copy == 0:
        return phrase
    lead, tail = LEADS[copy % len(LEADS)], TAILS[copy // len(LEADS)]
    body = phrase[0].lower() + phrase[1:] if lead else phrase
    return f"{lead}{body}{tail}"


def make_rows(scale: int, out: Path) -> int:
    """Write the bundled rows `scale` times (copy by copy), rewritten; the number of rows."""
    rows = [json.loads(line) for line in BUNDLED.read_text().splitlines() if line.strip()]
    assert scale <= len(LEADS) * len(TAILS), f"at most {len(LEADS) * len(TAILS)}x"
    with open(out, "w", encoding="utf-8") as f:
        for copy in range(scale):
            f.writelines(json.dumps({**row, "phrase": rewrite(row["phrase"], copy)}) + "\n" for row in rows)
    return scale * len(rows)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def one(stage: str, data_file: Path, base: Path, model: Path, work: Path,
        max_examples: int | None = None) -> dict:
    """One measurement, in this (fresh) process."""
    from slmflow.artifacts import ArtifactRef
    from slmflow.config import DataConfig, EvaluateConfig
    from slmflow.stage import Workspace
    from slmflow.stages import evaluate, prepare_data

    base_ref = ArtifactRef(kind="base_model", uri=str(base), sha256="0" * 64, key="bench",
                           meta={"external_model_dir": str(base)})
    source = ArtifactRef(kind="data_file", uri=str(data_file), sha256="0" * 64, key="bench")
    prepared = work / "prepared"
    if stage == "prepare_data":
        prepared.mkdir()
        ws = Workspace(out=prepared, work=work, log=lambda m: None)
        import transformers  # noqa: F401 - imported before the baseline, as in a running stage

        before = _rss_mb()
        started = time.perf_counter()
        stats = prepare_data.build(DataConfig(), ws, base_ref, source, None, "answer")
        seconds = time.perf_counter() - started
        rows = stats["train"]["rows"] + stats["eval"]["rows"]
    else:
        from slmflow import generate

        data = ArtifactRef(kind="dataset", uri=str(prepared), sha256="0" * 64, key="bench")
        ref = ArtifactRef(kind="merged_model", uri=str(model), sha256="0" * 64, key="bench",
                          meta={"external_model_dir": str(model)})
        backend = generate.load_backend(ref)  # loaded before the baseline: rows' cost alone
        generate.load_backend = lambda model, trust_remote_code=False: backend
        out = work / "evaluation"
        out.mkdir()
        ws = Workspace(out=out, work=work, log=lambda m: None)
        labels = DataConfig().labels
        before = _rss_mb()
        started = time.perf_counter()
        cfg = EvaluateConfig(max_examples=max_examples)
        metrics = evaluate.build(cfg, ws, ref, data, labels, "eval", False)
        seconds = time.perf_counter() - started
        rows = metrics["n"]
    if stage == "evaluate" and max_examples:
        stage = f"evaluate, max_examples={max_examples}"
    return {"stage": stage, "rows": rows, "seconds": round(seconds, 2),
            "peak_above_start_mb": round(max(_peak_mb() - before, 0.0), 1),
            "rss_start_mb": round(before, 1)}


def _run_one(stage: str, data_file: Path, args: argparse.Namespace, work: Path,
             max_examples: int | None = None) -> dict:
    load = load_average()
    cmd = [sys.executable, "-m", "bench.scaling", "--one", stage, "--data", str(data_file),
           "--base", str(args.base), "--eval-model", str(args.eval_model), "--work", str(work)]
    if max_examples:
        cmd += ["--max-examples", str(max_examples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO,
                          env={**os.environ, **ONE_THREAD})
    if proc.returncode:
        raise SystemExit(f"{stage} failed: {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "load_before": load, "load_after": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling")
    parser.add_argument("--base", type=Path, required=True, help="tokenizer for prepare_data")
    parser.add_argument("--eval-model", type=Path, required=True, help="PyTorch model to evaluate")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--eval-scales", type=int, nargs="+", default=None,
                        help="scales evaluated whole (default: every scale)")
    parser.add_argument("--sampled", type=int, default=None, metavar="N",
                        help="at the other scales, evaluate with evaluate.max_examples=N")
    parser.add_argument("--one", choices=("prepare_data", "evaluate"), help=argparse.SUPPRESS)
    parser.add_argument("--max-examples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.data, args.base.resolve(), args.eval_model.resolve(),
                             args.work, args.max_examples)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        for scale in args.scales:
            work = Path(tmp) / f"x{scale}"
            work.mkdir()
            data_file = work / "tones.jsonl"
            n = make_rows(scale, data_file)
            whole = args.eval_scales is None or scale in args.eval_scales
            for stage in ("prepare_data", "evaluate"):
                if stage == "evaluate" and not whole and not args.sampled:
                    continue
                sample = None if stage == "prepare_data" or whole else args.sampled
                r = {"scale": scale, "file_rows": n, **_run_one(stage, data_file, args, work, sample)}
                results.append(r)
                print(f"{scale}x {stage}: {r['rows']} rows, {r['seconds']} s, peak +"
                      f"{r['peak_above_start_mb']} MB, load {r['load_before'][0]}", flush=True)
    first = {}
    for r in results:
        first.setdefault(r["stage"].split(",")[0], r)  # each stage's smallest scale
    rows = []
    for r in results:
        b = first[r["stage"].split(",")[0]]
        per_row = 1000 * r["seconds"] / r["rows"]
        more = r["rows"] - b["rows"]  # what the rows beyond the smallest scale cost, each
        rows.append([r["stage"], f"{r['scale']}x", r["file_rows"], r["rows"], r["seconds"],
                     round(per_row, 2),
                     round(1000 * (r["seconds"] - b["seconds"]) / more, 2) if more > 0 else "-",
                     r["peak_above_start_mb"],
                     round(1024 * (r["peak_above_start_mb"] - b["peak_above_start_mb"]) / more, 3)
                     if more > 0 else "-",
                     r["load_before"][0]])
    header = ["stage", "scale", "file rows", "rows", "seconds", "ms/row",
              "ms/row beyond smallest", "peak MB above start", "KB/row beyond smallest",
              "load 1 min"]
    text = table(header, rows)
    print(text)
    write_result("scaling", {"base": str(args.base), "eval_model": str(args.eval_model),
                             "results": results})
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    (RESULTS / "scaling.md").write_text(
        f"bench.scaling, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs; evaluate on "
        f"{args.eval_model.name}\n\n" + "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
