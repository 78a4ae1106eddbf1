"""Benchmark: using a published model: `slmflow predict --input` on 1,000 rows and `slmflow serve`.

- predict: the CLI on a 1,000-row .jsonl (the bundled tone phrases, cycled), constrained and free;
  examples/s as the CLI reports it (inference only) and the command's wall time (load included).
  Beside it, bench.inference's figure measured here on the same rows: the evaluation's own
  generator (`generate_answers`, free, batch 16, no label scores).
- serve: requests/s and p50/p95 latency per request at 1 and 8 concurrent clients, one text a
  request (constrained), over HTTP (httpx) to `slmflow serve` on 127.0.0.1.

Run as:
    .venv/bin/python -m bench.predict                      # builds and runs the tiny Phi-3 first
    .venv/bin/python -m bench.predict --model runs/default/model
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import REPO, load_average, table, write_result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def tiny_model_folder() -> Path:
    """The tiny Phi-3 run's published model (built and run once into runs/bench/predict-tiny)."""
    out = REPO / "runs" / "bench" / "predict-tiny"
    if not (out / "run" / "model" / "slmflow_model.json").is_file():
        from slmflow.tiny import build_tiny_phi3

        build_tiny_phi3(out / "tiny-phi3", seed=0)
        subprocess.run([sys.executable, "-m", "slmflow.cli", "run", "--no-prefect", "--config",
                        "configs/tiny-phi3_lora_cpu.yaml", "--set",
                        f"model.name_or_path={out / 'tiny-phi3'}", "--set",
                        f"output_dir={out / 'run'}"], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    return out / "run" / "model"


def rows_file(folder: Path, n: int, where: Path) -> Path:
    card = json.loads((folder / "slmflow_model.json").read_text())
    data = REPO / "src" / "slmflow" / "data"
    phrases = [json.loads(line)["phrase"] for name in ("tones.jsonl", "tones_shifted.jsonl")
               for line in (data / name).open() if line.strip()]
    path = where / "rows.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({card["input_columns"][0]: phrases[i % len(phrases)], "id": i}) + "\n")
    return path


def bench_predict(folder: Path, rows: Path, free: bool) -> dict:
    out = rows.with_suffix(f".{'free' if free else 'constrained'}.out.jsonl")
    cmd = [sys.executable, "-m", "slmflow.cli", "predict", "--model", str(folder), "--input",
           str(rows), "--output", str(out)] + (["--free"] if free else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    last = proc.stderr.strip().splitlines()[-1]  # "N rows in S s: X examples/s (mode)"
    return {"what": f"slmflow predict --input ({'free' if free else 'constrained'})",
            "examples_per_second": float(last.split(": ")[1].split()[0]),
            "wall_seconds": round(wall, 1), "load_average": load_average()}


def bench_generator(folder: Path, rows: Path) -> dict:
    """bench.inference's figure: the evaluation's generator on the same rows (free, batch 16)."""
    from slmflow.classifier import Classifier
    from slmflow.generate import generate_answers

    clf = Classifier(folder)
    texts = [json.loads(line) for line in rows.open()]
    prompts = [clf.backend.tokenizer(clf.prompt(t))["input_ids"] for t in texts]
    clf.backend.generate([prompts[0]], clf.max_new_tokens)
    start = time.perf_counter()
    generate_answers(clf.backend.generate, prompts, clf.max_new_tokens)
    seconds = time.perf_counter() - start
    return {"what": "evaluation generator (bench.inference, free, batch 16)",
            "examples_per_second": round(len(prompts) / seconds, 1), "wall_seconds": "-",
            "load_average": load_average()}


def bench_serve(folder: Path, texts: list[str], requests: int) -> list[dict]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "slmflow.cli", "serve", "--model", str(folder),
                             "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stderr.read().decode()[-2000:]) from None
                time.sleep(0.3)
        for clients in (1, 8):
            def client(k: int, clients: int = clients) -> list[float]:
                took = []
                with httpx.Client(base_url=url, timeout=300) as c:
                    for i in range(k, requests, clients):
                        t0 = time.perf_counter()
                        c.post("/classify", json={"text": texts[i % len(texts)]}).raise_for_status()
                        took.append(time.perf_counter() - t0)
                return took

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                lat = [x for part in pool.map(client, range(clients)) for x in part]
            seconds = time.perf_counter() - start
            results.append({"clients": clients, "requests": len(lat),
                            "requests_per_second": round(len(lat) / seconds, 1),
                            "p50_ms": round(1000 * percentile(lat, 0.5), 1),
                            "p95_ms": round(1000 * percentile(lat, 0.95), 1),
                            "load_average": load_average()})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a published OUTPUT_DIR/model (default: the tiny Phi-3's)")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200, help="serve: requests per setting")
    args = parser.parse_args()
    folder = Path(args.model).resolve() if args.model else tiny_model_folder()
    before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        rows = rows_file(folder, args.rows, Path(tmp))
        texts = [next(iter(json.loads(line).values())) for line in rows.open()]
        predicts = [bench_generator(folder, rows), bench_predict(folder, rows, free=False),
                    bench_predict(folder, rows, free=True)]
        serve = bench_serve(folder, texts, args.requests)
    print(f"{folder}: {args.rows} rows (load average before {before}, after {load_average()})")
    print(table(["what", "ex/s", "wall s (load incl.)", "load avg"],
                [[r["what"], r["examples_per_second"], r["wall_seconds"], r["load_average"]]
                 for r in predicts]))
    print(table(["serve clients", "requests", "req/s", "p50 ms", "p95 ms", "load avg"],
                [[r["clients"], r["requests"], r["requests_per_second"], r["p50_ms"], r["p95_ms"],
                  r["load_average"]] for r in serve]))
    write_result("predict", {"model": str(folder), "rows": args.rows, "load_average_before": before,
                             "predict": predicts, "serve": serve})


if __name__ == "__main__":
    main()
