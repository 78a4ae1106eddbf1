"""The embedded default on the real SmolLM2-135M-Instruct: accuracy that means something.

This is the README's run command (`slmflow run`), through Prefect's ephemeral API, into a temp
folder. Minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _slmflow_run(out: Path, home: Path) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "slmflow.cli", "run", "--set", f"output_dir={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out / 'report.json'}"
    return proc, json.loads((out / "report.json").read_text())


def test_default_run_reaches_accuracy_and_reruns_cached(tmp_path):
    _, report = _slmflow_run(tmp_path / "run", tmp_path / "prefect")
    models = report["models"]
    assert models["exported"]["accuracy"] >= 0.90, models["exported"]
    assert models["merged"]["accuracy"] - models["exported"]["accuracy"] <= 0.02
    assert models["base"]["accuracy"] < models["merged"]["accuracy"]
    assert models["exported"]["n"] == report["data"]["eval"]["rows"] >= 120

    import onnxruntime_genai as og

    og.Model(report["exported_model_dir"])  # the int4 folder loads in onnxruntime-genai

    _, again = _slmflow_run(tmp_path / "run", tmp_path / "prefect")
    assert all(s["cached"] for s in again["stages"].values()), again["stages"]
    assert again["models"] == models
