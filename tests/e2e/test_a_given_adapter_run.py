"""finetune.adapter_path on the tiny Phi-3: an adapter trained once, then given to a run that
trains nothing, and an Olive config doing what `olive generate-adapter` does (the base with its
adapter_path, ModelBuilder, ExtractAdapters) run from the command line on the same adapter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.pipeline import run_pipeline, run_plain
from slmflow.artifacts import MANIFEST
from slmflow.configio import build_config, load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _config(tiny_model: Path, out: Path, **finetune: object):
    base = load_config(REPO / "configs" / "tiny-phi3_lora_cpu.yaml", [
        f"model.name_or_path={tiny_model}", f"output_dir={out}"]).model_dump(mode="json")
    base["finetune"].update({"max_steps": 20, **finetune})  # sameness is checked, not learning
    return build_config(base, source="test")


def _predictions(report: dict, label: str) -> list[str]:
    lines = (Path(report["stages"][label]["uri"]) / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line)["pred"] for line in lines]


def test_a_given_adapter_runs_without_training_and_as_olive_generate_adapter(
        tiny_model, tmp_path, monkeypatch, capfd):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLMFLOW_CACHE", str(cache))  # one cache for the three runs
    trained = json.loads(run_pipeline(_config(tiny_model, tmp_path / "trained"), run_plain).read_text())
    mine = tmp_path / "my-adapter"  # what a user brings: the folder save_pretrained wrote
    mine.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(Path(trained["stages"]["finetune"]["uri"]) / name, mine / name)

    assert "'loss'" in capfd.readouterr().out  # the Trainer logs each step's loss
    # other training settings: unused, nothing is trained
    given = json.loads(run_pipeline(_config(tiny_model, tmp_path / "given", adapter_path=str(mine),
                                            learning_rate=0.1, max_steps=3), run_plain).read_text())
    out, err = capfd.readouterr()
    assert "'loss'" not in out and "[finetune] finetune: adapter given (" in err
    stage = given["stages"]["finetune"]
    assert stage["cached"] is False and stage["key"] != trained["stages"]["finetune"]["key"]
    assert sorted(p.name for p in Path(stage["uri"]).iterdir() if p.name != MANIFEST) == [
        "adapter_config.json", "adapter_model.safetensors", "train_log.json"]
    info = given["training"]["given"]
    assert info["adapter_path"] == str(mine) and info["r"] == 16 and "steps" not in given["training"]
    assert "No training: the adapter was given" in (tmp_path / "given" / "report.md").read_text()
    card = json.loads((tmp_path / "given" / "model" / "slmflow_model.json").read_text())
    assert card["given_adapter"] == {"adapter_path": str(mine), "sha256": info["sha256"]}
    # the same adapter, the same merged model: the same answers, row for row
    assert _predictions(given, "evaluate_merged") == _predictions(trained, "evaluate_merged")
    assert _predictions(given, "evaluate_exported") == _predictions(trained, "evaluate_exported")

    # olive generate-adapter's workflow (olive/cli/generate_adapter.py's TEMPLATE), from the
    # transformers base and the adapter: the int4 base with LoRA inputs and an .onnx_adapter file
    work = tmp_path / "olive"
    work.mkdir()
    olive = {
        "input_model": {"type": "HfModel", "model_path": str(tiny_model), "adapter_path": str(mine)},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {"b": {"type": "ModelBuilder", "precision": "int4",
                         "int4_algo_config": "k_quant_mixed"},
                   "e": {"type": "ExtractAdapters", "adapter_type": "lora",
                         "save_format": "onnx_adapter"}},
        "host": "local_system", "target": "local_system", "no_artifacts": True,
        "output_dir": "optimized-model", "log_severity_level": 3,
        "cache_config": {"account_name": None, "container_name": None},
    }
    (work / "olive-config.json").write_text(json.dumps(olive, indent=2))
    cmd = [sys.executable, "-m", "slmflow.cli", "run", "--no-prefect", "--config", "olive-config.json",
           # nothing is trained: data.* names the rows evaluated (the tiny config's)
           "--set", "data.train_file=pkg:slmflow/data/tones_small.jsonl", "--set", "data.eval_split=0.25",
           "--set", "evaluate.max_new_tokens=4", "--set", "evaluate.max_accuracy_drop=1.0"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [note] = [line for line in proc.stderr.splitlines()
              if line.startswith("olive: input_model.adapter_path: ")]
    assert "→ finetune.adapter_path = " in note and "nothing trained" in note
    report = json.loads((work / "optimized-model" / "report.json").read_text())
    assert report["stages"]["finetune"]["cached"] is True  # the same adapter on the same base
    assert report["stages"]["finetune"]["key"] == stage["key"]
    assert report["stages"]["merge"]["key"] == given["stages"]["merge"]["key"]
    assert report["models"]["exported"]["model_kind"] == "onnx_base+adapter"
    assert "given" in report["training"] and report["config"]["export"]["adapters"] == "separate"
    published = work / "optimized-model" / "model"
    card = json.loads((published / "slmflow_model.json").read_text())
    [entry] = card["adapters"]["files"].values()
    assert (published / entry["file"]).is_file()
    assert card["given_adapter"]["sha256"] == info["sha256"]
    # the merged model of the same adapter, merged here again or not: the same answers
    assert _predictions(report, "evaluate_merged") == _predictions(given, "evaluate_merged")
