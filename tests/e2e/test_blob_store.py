"""The shared stage store on Azure Blob, against Azurite on 127.0.0.1: a second run in another
working directory reuses the first run's stage outputs (downloaded and hash-verified).

Azurite (the `azurite` fixture of conftest.py) is the npm package `azurite`, installed once into
~/.cache/slmflow/azurite (or $SLMFLOW_AZURITE_DIR); the test skips only where node/npm are missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from slmflow.configio import load_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
def _run(workdir: Path, tiny_model: Path, monkeypatch) -> dict:
    from flows.pipeline import run_pipeline, run_plain

    monkeypatch.chdir(workdir)
    config = load_config(REPO / "configs" / "tiny-phi3_lora_cpu.yaml", [
        f"model.name_or_path={tiny_model}", "output_dir=runs/tiny", "finetune.max_steps=8",
        "finetune.checkpoint_every=8", "evaluate.limit=4", "cache_remote=az://slmflow/shared"])
    return json.loads(run_pipeline(config, run_plain).read_text())


def test_second_working_directory_reuses_stage_outputs_from_blob(azurite, tiny_model, tmp_path,
                                                                 monkeypatch):
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(azurite)
    service.create_container("slmflow")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    first = _run(tmp_path / "a", tiny_model, monkeypatch)
    assert not any(s["cached"] for s in first["stages"].values())
    blobs = {b.name for b in service.get_container_client("slmflow").list_blobs()}
    for stage in ("dataset", "adapter", "merged_model", "onnx_model", "evaluation"):
        assert any(n.startswith(f"shared/{stage}/") and n.endswith("slmflow-artifact.json")
                   for n in blobs), stage
    assert not any(n.startswith("shared/base_model/") for n in blobs)  # a pointer to a local folder

    t0 = time.perf_counter()
    second = _run(tmp_path / "b", tiny_model, monkeypatch)
    seconds = time.perf_counter() - t0
    reused = {name: s["cached"] for name, s in second["stages"].items()}
    assert reused.pop("base_model") is False  # rebuilt locally: a pointer to the tiny model
    assert all(reused.values()), reused
    for name in reused:
        assert second["stages"][name]["sha256"] == first["stages"][name]["sha256"], name
        assert second["stages"][name]["uri"].startswith(str(tmp_path / "b")), name
    assert second["models"]["exported"]["accuracy"] == first["models"]["exported"]["accuracy"]
    assert (tmp_path / "b" / "runs" / "tiny" / "model" / "model.onnx").is_file()
    print(f"second run, all stages from blob: {seconds:.1f} s")
