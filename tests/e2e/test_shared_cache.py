"""One stage cache shared by output folders (issue 22), on the tiny Phi-3 through the CLI.

A run in out/a builds every stage; the same config in out/b reuses all of them from the shared
cache; `slmflow cache prune --all` empties the cache and out/b/model still loads and generates.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny-phi3_lora_cpu.yaml"
pytestmark = pytest.mark.slow


def _slmflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "slmflow.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _stage_lines(stderr: str) -> dict[str, str]:
    return dict(re.findall(r"^\[([\w\[\]]+)\] (done|cached): ", stderr, flags=re.MULTILINE))


def test_a_new_output_folder_reuses_every_stage_and_its_model_outlives_the_cache(tiny_model, tmp_path):
    from slmflow import cache
    from slmflow.stages.export import smoke_generate

    shared = tmp_path / "shared-cache"
    env = {**os.environ, "SLMFLOW_CACHE": str(shared), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    a, b = tmp_path / "out" / "a", tmp_path / "out" / "b"

    def run(out: Path) -> tuple[dict[str, str], dict]:
        proc = _slmflow(env, "run", "--no-prefect", "--config", CONFIG, "--set",
                        f"model.name_or_path={tiny_model}", "--set", f"output_dir={out}")
        return _stage_lines(proc.stderr), json.loads((out / "report.json").read_text())

    first, report_a = run(a)
    assert first and set(first.values()) == {"done"}, first
    assert not (a / "cache").exists() and (shared / "adapter").is_dir()  # outside the output folder
    second, report_b = run(b)
    assert second.keys() == first.keys() and set(second.values()) == {"cached"}, second
    assert all(s["cached"] for s in report_b["stages"].values()), report_b["stages"]
    assert report_b["stages"]["export"]["sha256"] == report_a["stages"]["export"]["sha256"]

    listing = _slmflow(env, "cache", "ls").stdout
    onnx_row = next(line for line in listing.splitlines() if line.startswith("onnx_model/"))
    assert f"{a} (model)" in onnx_row and f"{b} (model)" in onnx_row, listing

    pruned = _slmflow(env, "cache", "prune", "--all").stdout
    assert f"{b}/model keeps its own copy and still loads" in pruned, pruned
    assert cache.entries(shared) == []
    model = b / "model"
    files = [p for p in model.iterdir() if p.is_file()]
    assert files and not [p for p in files if p.is_symlink()]
    written = {"manifest.json", "slmflow_model.json"}  # by the publish step, per output folder
    assert all(p.stat().st_nlink == 2 for p in files if p.name not in written)  # a and b only
    assert isinstance(smoke_generate(model, "### Text: hello\n### The tone is:\n"), str)
