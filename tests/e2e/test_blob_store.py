"""The shared stage store on Azure Blob, against Azurite on 127.0.0.1: a second run in another
working directory reuses the first run's stage outputs (downloaded and hash-verified).

Azurite is the npm package `azurite`, installed once into ~/.cache/slmflow/azurite (or
$SLMFLOW_AZURITE_DIR); the test skips only where node/npm are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from slmflow.configio import load_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
# Azurite's documented development account (public, the same in every Azurite).
ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _azurite_bin() -> Path:
    if not (shutil.which("node") and shutil.which("npm")):
        reason = "Azurite needs node and npm (apt-get install nodejs npm)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI has them: a missing one is a broken CI, not a skip
        pytest.skip(reason)
    home = Path(os.environ.get("SLMFLOW_AZURITE_DIR", Path.home() / ".cache/slmflow/azurite"))
    binary = home / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "azurite@3"],
                       cwd=home, check=True, timeout=600)
    return binary


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    """Azurite's blob service on 127.0.0.1 (a free port, a temporary folder), stopped afterwards."""
    binary = _azurite_bin()
    port = _free_port()
    data = tmp_path_factory.mktemp("azurite")
    proc = subprocess.Popen(
        [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data),
         "--silent", "--skipApiVersionCheck", "--loose"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Azurite did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
        yield (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={DEV_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
