"""The GPU check's CPU-side parts: its runs are valid slmflow configs (it runs on a GPU machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_plans_valid_runs_at_one_and_all_gpus():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--plan", "--steps", "7"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["1 GPU", "2 GPUs"]
    assert all("--config configs/phi3-mini_qlora_cuda.yaml" in ln and "finetune.max_steps=7" in ln
               for ln in lines)
    assert "finetune.distributed.processes_per_node=2" in lines[1]
