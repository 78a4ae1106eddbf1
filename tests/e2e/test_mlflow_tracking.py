"""MLflow tracking on the tiny Phi-3 through Prefect, against a real `mlflow server` on 127.0.0.1
(SQLite backend, local artifact root): params, step metrics, per-model metrics, artifacts, the
registered model version and its tags, no secret anywhere in the store; a cached rerun is a
second run that says what it reused.

The server is the full `mlflow` package of the dev extra; the pipeline needs only mlflow-skinny
(the `tracking` extra)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from slmflow.configio import load_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
MODEL_NAME = "tiny-tones"
SECRETS = {"HF_TOKEN": "hf_slmflowMLFLOWsecret123", "AZURE_CLIENT_SECRET": "azMlflowSecret456",
           "MLFLOW_TRACKING_TOKEN": "mlflowTokenSecret789"}  # the client sends it; nothing stores it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free 127.0.0.1 port, stopped (its whole process group) afterwards."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # first start creates the database (tens of seconds)
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start: "
                                       + (root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield url, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            # uvicorn stops at once; the `mlflow server` parent took 18.6 s more to exit here
            # (2.7 s in a probe without the pipeline's traffic); its state is in tmp_path: 5 s, then kill
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _run(config) -> tuple[dict, str]:
    from flows.pipeline import slmflow_pipeline

    state = slmflow_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    return json.loads(Path(state.result()).read_text()), str(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def two_runs(prefect_api, tiny_model, mlflow_server, tmp_path_factory):
    """The tiny pipeline with tracking and log_model, then again (every stage cached)."""
    url, _ = mlflow_server
    out = tmp_path_factory.mktemp("tracked") / "run"
    config = load_config(REPO / "configs" / "tiny-phi3_lora_cpu.yaml", [
        f"model.name_or_path={tiny_model}", f"output_dir={out}", "finetune.max_steps=6",
        "finetune.checkpoint_every=3", "evaluate.limit=8", "tracking.enabled=true", f"tracking.uri={url}",
        "tracking.experiment=tiny", "tracking.log_model=true", f"tracking.model_name={MODEL_NAME}"])
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)
    try:
        first = _run(config)
        second = _run(config)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return config, first, second


def _client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(url)


def _runs(url: str):
    client = _client(url)
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_tracked_run_holds_params_step_metrics_model_metrics_artifacts_and_the_model(
        two_runs, mlflow_server):
    from slmflow.registry import content_sha256, file_hashes
    from slmflow.tracking_values import flatten

    url, _ = mlflow_server
    config, (report, flow_run_id), _ = two_runs
    client = _client(url)
    run = _runs(url)[0]
    rid = run.info.run_id
    assert run.info.status == "FINISHED"

    # the resolved config, flattened: every key, values as the config holds them
    assert run.data.params == flatten(config.model_dump(mode="json"))
    assert run.data.params["finetune.max_steps"] == "6"
    assert run.data.params["finetune.target_modules"] == '["qkv_proj", "o_proj"]'

    # the loss per step: one point per logged step, the report's values
    curve = report["training"]["loss_curve"]
    history = sorted(client.get_metric_history(rid, "train/loss"), key=lambda m: m.step)
    assert len(curve) >= 2 and len(history) == len(curve)
    assert [(m.step, m.value) for m in history] == [(p["step"], p["loss"]) for p in curve]

    # each model's accuracy, macro-F1, latency and size; the gate; stage seconds and cached flags
    metrics = run.data.metrics
    for who in ("base", "merged", "exported"):
        for name in ("accuracy", "macro_f1", "latency_ms_p50", "size_bytes"):
            assert metrics[f"eval/{who}/{name}"] == pytest.approx(report["models"][who][name]), name
    assert metrics["quality_gate/passed"] == 1.0 and run.data.tags["slmflow.quality_gate"] == "passed"
    assert metrics["stage/finetune/cached"] == 0.0
    assert metrics["stage/finetune/seconds"] == pytest.approx(report["stages"]["finetune"]["seconds"])

    # tied to the Prefect flow run, both ways
    tags = run.data.tags
    assert tags["slmflow.prefect.flow_run_id"] == flow_run_id
    assert tags["slmflow.reused_stages"] == "" and "finetune" in tags["slmflow.built_stages"]
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    link = next(a for a in artifacts if a.key == "mlflow-run")
    assert f"/runs/{rid}" in str(link.data) and url in str(link.data)

    # the report, its pictures and the manifest as artifacts
    assert {f.path for f in client.list_artifacts(rid, "report")} >= {
        "report/report.json", "report/report.md", "report/loss_curve.svg",
        "report/confusion_exported.svg"}
    assert "manifest.json" in {f.path for f in client.list_artifacts(rid)}

    # the model: one version, its tags the published folder's hashes, its files those bytes
    [version] = client.search_model_versions(f"name = '{MODEL_NAME}'")
    published = Path(config.output_dir) / "model"
    files = file_hashes(published)
    assert version.run_id == rid and tags["slmflow.model_version"] == version.version
    # (the cached rerun published the folder again: only manifest.json's creation time differs)
    assert version.tags["slmflow.content_sha256"] == content_sha256(files)
    assert version.tags["slmflow.export.sha256"] == report["stages"]["export"]["sha256"]
    tagged = {k.removeprefix("slmflow.file."): v for k, v in version.tags.items()
              if k.startswith("slmflow.file.")}
    assert {"model.onnx", "genai_config.json", "manifest.json", "slmflow_model.json"} <= set(tagged)
    assert {n: h for n, h in tagged.items() if n != "manifest.json"} == {
        n: h for n, h in files.items() if n != "manifest.json"}
    import mlflow.artifacts

    fetched = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=version.source, tracking_uri=url,
        dst_path=str(Path(config.output_dir).parent / "fetched")))
    assert file_hashes(fetched) == tagged  # the registry's files are the tagged bytes


def test_a_cached_rerun_is_a_second_run_that_names_what_it_reused(two_runs, mlflow_server):
    url, _ = mlflow_server
    _, (_, first_flow), (report, flow_run_id) = two_runs
    assert all(s["cached"] for s in report["stages"].values())
    client = _client(url)
    first, second = _runs(url)
    assert second.info.status == "FINISHED" and flow_run_id != first_flow
    tags = second.data.tags
    assert tags["slmflow.prefect.flow_run_id"] == flow_run_id
    assert set(tags["slmflow.reused_stages"].split(",")) == set(report["stages"])
    assert tags["slmflow.built_stages"] == "" and second.data.metrics["stage/finetune/cached"] == 1.0
    assert "reused" in tags["mlflow.note.content"]
    # no step metrics logged again: the curve stays in the run that trained the adapter
    assert client.get_metric_history(second.info.run_id, "train/loss") == []
    assert tags["slmflow.loss_curve_run"] == first.info.run_id
    assert second.data.metrics["eval/exported/accuracy"] == first.data.metrics["eval/exported/accuracy"]
    # the same ONNX files: the version registered by the first run, not a second one
    [version] = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert tags["slmflow.model_version"] == version.version
    assert tags["slmflow.model_version_reused"] == "true"


def test_no_secret_reaches_the_mlflow_store(two_runs, mlflow_server):
    """Params, tags, metrics, model versions (the SQLite database) and every artifact file."""
    _, root = mlflow_server
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "server.log"]
    assert any(p.suffix == ".db" for p in files) and any(p.name == "model.onnx" for p in files)
    leaks = [f"{p}: {name}" for p in files for name, value in SECRETS.items()
             if value.encode() in p.read_bytes()]
    assert leaks == []
