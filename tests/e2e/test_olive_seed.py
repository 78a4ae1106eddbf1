"""Olive configs end to end on the tiny Phi-3: `slmflow run --config olive-config.json`.

The seed's example config, assembled from its blocks (QLoRA by `double_quant: true`, join corpus
strategy, merge, int4 ModelBuilder), and an Olive 0.13 config (`type: QLoRA`, flat keys, top-level
engine keys), each run as a user would: a subprocess in the folder holding the config, so relative
paths (`dataset/...`, `engine.output_dir`) resolve there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OLIVE = REPO / "tests" / "assets" / "olive"
TONES = REPO / "src" / "slmflow" / "data" / "tones_small.jsonl"
pytestmark = pytest.mark.slow


def _run(work: Path, config: dict, *overrides: str) -> subprocess.CompletedProcess:
    path = work / "olive-config.json"
    path.write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, "-m", "slmflow.cli", "run", "--no-prefect", "--config", str(path),
           # the tiny random-init model's int4 copy answers differently: no quality gate here
           "--set", "evaluate.max_accuracy_drop=1.0", *overrides]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=1500, check=False)
    print(f"{path.name}: exit {proc.returncode} in {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _exported(output_dir: Path) -> tuple[dict, Path]:
    report = json.loads((output_dir / "report.json").read_text())
    exported = Path(report["exported_model_dir"])
    assert exported.is_relative_to(output_dir)
    assert (exported / "model.onnx").is_file() and (exported / "genai_config.json").is_file()
    return report, exported


def test_seed_example_config_runs_end_to_end(tiny_model, tmp_path):
    work = tmp_path / "work"
    (work / "dataset").mkdir(parents=True)
    shutil.copy(TONES, work / "dataset" / "dataset-classification.json")  # the seed's data file
    config = json.loads((OLIVE / "seed_full.json").read_text())
    config["input_model"]["config"]["hf_config"]["model_name"] = str(tiny_model)
    # Run here, not on AzureML: the seed's engine without host/target (its systems stay, unused).
    config["engine"] = {k: v for k, v in config["engine"].items() if k not in ("host", "target")}

    # The seed targets CUDAExecutionProvider; this machine's onnxruntime-genai runs CPU models.
    proc = _run(work, config, "--set", "export.execution_provider=cpu")

    output_dir = (work / config["engine"]["output_dir"]).resolve()  # ../model-cache/... here
    assert output_dir == tmp_path / "model-cache" / "models" / "phi3-finetuned"
    report, exported = _exported(output_dir)
    assert exported == output_dir / "model"  # the published int4 model; its stage folder:
    assert Path(report["stages"]["export"]["uri"]).is_relative_to(
        (work / config["engine"]["cache_dir"]).resolve())
    finetune = report["config"]["finetune"]
    assert (finetune["method"], finetune["r"], finetune["alpha"]) == ("qlora", 64, 64.0)
    assert report["training"]["steps"] == 10 and report["config"]["data"]["corpus_strategy"] == "join"
    stats = json.loads((Path(report["stages"]["prepare_data"]["uri"]) / "stats.json").read_text())
    assert stats["train"]["joined_rows"] == 64 - stats["eval"]["rows"]
    assert stats["train"]["max_len"] <= 512  # source_max_len 2048, capped at the tiny context
    notes = report["config"]["notes"]
    assert any(n.startswith("passes.lora.config.lora_alpha: 64 → finetune.alpha = 64") for n in notes)
    assert any(n.startswith("engine.search_strategy: false → noted:") for n in notes)
    assert "olive: passes.lora.config.lora_r: 64 → finetune.r = 64" in proc.stderr


def test_olive_013_qlora_config_runs_end_to_end(tiny_model, tmp_path):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(TONES, work / "data" / "train.jsonl")
    shutil.copy(REPO / "tests" / "assets" / "tones_other.jsonl", work / "data" / "eval.jsonl")
    config = json.loads((OLIVE / "olive013.json").read_text())
    config["input_model"]["model_path"] = str(tiny_model)

    _run(work, config, "--set", "evaluate.limit=32")

    report, _ = _exported(work / "out" / "phi3-tones")
    assert report["config"]["finetune"]["method"] == "qlora"
    assert report["config"]["data"]["eval_file"] == "data/eval.jsonl"
    assert report["export"]["builder_options"]["algo_config"] == "k_quant_mixed"


def test_olive_multi_lora_config_runs_end_to_end(tiny_model, tmp_path):
    """Olive's multi-LoRA flow (LoRA, ModelBuilder, ExtractAdapters; no merge): the int4 base and
    an .onnx_adapter file, evaluated through onnxruntime-genai's Adapters API."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(TONES, work / "data" / "train.jsonl")
    shutil.copy(REPO / "tests" / "assets" / "tones_other.jsonl", work / "data" / "eval.jsonl")
    config = json.loads((OLIVE / "olive013.json").read_text())
    config["input_model"]["model_path"] = str(tiny_model)
    config["passes"] = {k: v for k, v in config["passes"].items()
                        if v["type"] != "MergeAdapterWeights"}
    config["passes"]["extract"] = {"type": "ExtractAdapters", "make_inputs": True,
                                   "save_format": "onnx_adapter"}

    _run(work, config, "--set", "evaluate.limit=32")

    report, exported = _exported(work / "out" / "phi3-tones")
    assert report["config"]["export"]["adapters"] == "separate"
    assert report["models"]["exported"]["model_kind"] == "onnx_base+adapter"
    assert report["stages"]["export_adapter"]["cached"] is False
    assert [p.name for p in exported.glob("*.onnx_adapter")] == ["train.onnx_adapter"]
