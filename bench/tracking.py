"""Benchmark: what MLflow tracking adds to a run, against the same run untracked.

Starts a real `mlflow server` (SQLite, 127.0.0.1, a temporary folder), runs the tiny Phi-3
pipeline once with tracking and log_model (cold: fills the stage cache, logs the loss curve,
uploads and registers the model), then the same config all cached, alternating tracking off and
on (`--repeat` each; the model is registered once, so the tracked reruns log params, metrics, the
report and the manifest and find the version). Prints the cached runs' median seconds side by
side (off = the baseline), the difference and the ratio, and how long the preflight takes to
refuse a server that is down. Plain stage functions (no Prefect): the figure is tracking's own.

Run as:
    .venv/bin/python -m bench.tracking [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import REPO, load_average, table, write_result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str, float]:
    port = _free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url, time.perf_counter() - started
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server did not start") from None
            time.sleep(0.5)


def timed_run(config) -> float:
    from flows.pipeline import run_pipeline, run_plain

    started = time.perf_counter()
    run_pipeline(config, run_plain)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from slmflow.configio import load_config
    from slmflow.errors import ConfigError
    from slmflow.tiny import build_tiny_phi3
    from slmflow.tracking_check import check_tracking

    root = Path(tempfile.mkdtemp(prefix="slmflow-bench-tracking-"))
    os.environ["SLMFLOW_CACHE"] = str(root / "cache")
    load_before = load_average()
    proc, url, server_seconds = start_server(root / "mlflow")
    try:
        model = build_tiny_phi3(root / "tiny-phi3", seed=0)
        base = [f"model.name_or_path={model}", f"output_dir={root / 'run'}", "finetune.max_steps=6",
                "evaluate.limit=8", f"tracking.uri={url}", "tracking.log_model=true"]

        def config(on: bool):
            return load_config(REPO / "configs" / "tiny-phi3_lora_cpu.yaml",
                               [*base, f"tracking.enabled={str(on).lower()}"])

        cold = timed_run(config(True))
        off, on = [], []
        for _ in range(args.repeat):
            off.append(timed_run(config(False)))
            on.append(timed_run(config(True)))
        down = load_config(None, ["tracking.enabled=true", f"tracking.uri=http://127.0.0.1:{_free_port()}"])
        started = time.perf_counter()
        try:
            check_tracking(down.tracking)
        except ConfigError:
            refused = time.perf_counter() - started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
    med_off, med_on = statistics.median(off), statistics.median(on)
    print(table(["cached run", "tracking off (baseline)", "tracking on", "on - off (s)", "on / off"],
                [["median seconds", round(med_off, 2), round(med_on, 2),
                  round(med_on - med_off, 2), round(med_on / med_off, 2)]]))
    print(f"cold tracked run {cold:.1f} s; mlflow server start {server_seconds:.1f} s; "
          f"preflight refusing a server that is down {refused * 1000:.0f} ms")
    print(f"load average before {load_before}, after {load_average()}")
    write_result("tracking", {"repeat": args.repeat, "cached_off_s": off, "cached_on_s": on,
                              "cold_tracked_s": cold, "server_start_s": server_seconds,
                              "refused_down_s": refused, "load_before": load_before})


if __name__ == "__main__":
    main()
