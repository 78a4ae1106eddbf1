"""tracking.*: the config's refusals, the preflight's verdicts on the server (one line, exit 2,
before any stage), params within MLflow's limits and without secrets, metric names, and the
model registration both the pipeline and `slmflow.azureml.register` use (a local SQLite store)."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from slmflow.configio import load_config
from slmflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _config(*overrides: str):
    return load_config(None, ["tracking.enabled=true", *overrides])


@pytest.mark.parametrize(("override", "match"), [
    ("tracking.run_name={output_name}-{user}", r"tracking.run_name: unknown field\(s\) \['user'\]"),
    ("tracking.run_name={output_name", r"tracking.run_name: .* is no valid template"),
    ("tracking.uri=http://me:pw@mlflow.example.com", r"tracking.uri: the URI holds credentials"),
    ("tracking.uri=ftp://mlflow.example.com", r"tracking.uri: 'ftp://mlflow.example.com' is no MLflow"),
    ("tracking.uri=http://", r"tracking.uri: 'http://' names no host"),
    ("tracking.model_name=my model", r"tracking.model_name"),
    ("tracking.enabled=maybe", r"tracking.enabled"),
    ("tracking.log_models=true", r"tracking.log_models"),
])
def test_bad_tracking_config_is_refused_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        _config(override)


def test_env_uri_needs_mlflow_tracking_uri(monkeypatch):
    from slmflow.tracking_check import check_tracking, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"tracking.uri: 'env' takes the URI from MLFLOW_TRACKING_URI"):
        check_tracking(_config().tracking)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:p@host:5000")
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI: the URI holds credentials"):
        tracking_uri(_config().tracking)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.com:5000")
    assert tracking_uri(_config().tracking) == "http://mlflow.example.com:5000"
    assert tracking_uri(_config("tracking.uri=http://other:5000").tracking) == "http://other:5000"


def test_tracking_off_checks_nothing(monkeypatch):
    from slmflow.tracking_check import check_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_tracking(load_config(None, []).tracking)  # the default: off, no server needed


def test_without_the_mlflow_client_the_fix_is_named(monkeypatch):
    import importlib.util

    from slmflow.tracking_check import check_tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'slmflow\[tracking\]'"):
        check_tracking(_config("tracking.uri=http://127.0.0.1:9").tracking)


class _Answer(http.server.BaseHTTPRequestHandler):
    status, body = 200, b"{}"
    seen: ClassVar[list[dict[str, str]]] = []

    def do_GET(self):
        type(self).seen.append(dict(self.headers))
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_answer():
    """An HTTP server on 127.0.0.1 answering every GET with _Answer.status and .body."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(("status", "body", "match"), [
    (200, b'{"experiment": {}}', None),
    (404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}', None),
    (401, b"", r"refuses us \(HTTP 401\); set MLFLOW_TRACKING_TOKEN"),
    (404, b"<html>not found</html>", r"answers HTTP 404 to MLflow's REST API; is it an MLflow"),
])
def test_the_preflight_asks_the_server_once(http_answer, monkeypatch, status, body, match):
    from slmflow.tracking_check import check_tracking

    monkeypatch.setattr(_Answer, "status", status)
    monkeypatch.setattr(_Answer, "body", body)
    monkeypatch.setattr(_Answer, "seen", [])
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456")
    cfg = _config(f"tracking.uri={http_answer}").tracking
    if match is None:
        check_tracking(cfg)
    else:
        with pytest.raises(ConfigError, match=match):
            check_tracking(cfg)
    assert [h.get("Authorization") for h in _Answer.seen] == ["Bearer tok-123456"]


def test_server_down_exits_2_before_any_stage_on_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
           "SLMFLOW_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "slmflow.cli", "run", "--set", f"output_dir={out}",
         "--set", "tracking.enabled=true", "--set", f"tracking.uri=http://127.0.0.1:{port}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: tracking.uri: no MLflow server answers at http://127.0.0.1:{port}"), lines
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing ran, nothing written


def test_params_are_the_flattened_config_within_limits_and_without_secrets(monkeypatch):
    from slmflow.tracking_check import secret_values
    from slmflow.tracking_values import MAX_PARAM_VALUE, config_params, flatten

    monkeypatch.setenv("HF_TOKEN", "hf_unitSECRETvalue42")
    config = load_config(None, ["finetune.max_steps=7"])
    config.notes = ["from the token hf_unitSECRETvalue42", "x" * 7000]
    params = config_params(config, secret_values())
    assert set(params) == set(flatten(config.model_dump(mode="json")))
    assert params["finetune.max_steps"] == "7" and params["tracking.enabled"] == "false"
    assert params["evaluate.extra_files"] == "null"
    assert "hf_unitSECRETvalue42" not in "".join(params.values()) and "***" in params["notes"]
    assert len(params["notes"]) == MAX_PARAM_VALUE and params["notes"].endswith("...")


def test_metric_names_and_summary_metrics_from_a_report():
    from slmflow.tracking_values import metric_key, report_metrics

    assert metric_key("stage", "evaluate_exported[tones_shifted]", "seconds") == \
        "stage/evaluate_exported:tones_shifted/seconds"
    assert metric_key("a b", "c*d") == "a b/c_d"
    report = {
        "sets": {"eval": {"models": {"exported": {"accuracy": 0.5, "macro_f1": 0.4,
                                                   "latency_ms_p50": 12.0, "size_bytes": 100,
                                                   "confusion": {}}},
                          "fidelity": {"exported_vs_merged": {"agreement": 0.9, "label_kl_mean": None},
                                       "merged_vs_trained": {"agreement": 0.8}}}},
        "quality_gate": {"passed": False, "drop": 0.1},
        "training": {"final_loss": 1.5, "steps": 4, "loss_curve": [{"step": 1, "loss": 2.0}]},
        "stages": {"export[k_quant]": {"seconds": 3.5, "cached": True}},
        "total_seconds": 9.0,
    }
    assert report_metrics(report) == {
        "eval/exported/accuracy": 0.5, "eval/exported/macro_f1": 0.4,
        "eval/exported/latency_ms_p50": 12.0, "eval/exported/size_bytes": 100.0,
        "eval/exported_vs_merged/agreement": 0.9, "eval/merged_vs_trained/agreement": 0.8,
        "quality_gate/passed": 0.0,
        "quality_gate/drop": 0.1, "train/final_loss": 1.5, "train/steps": 4.0,
        "stage/export:k_quant/seconds": 3.5, "stage/export:k_quant/cached": 1.0,
        "total_seconds": 9.0}


def _model_folder(root: Path, weights: bytes = b"onnx-bytes") -> Path:
    model = root / "model"
    model.mkdir(parents=True)
    (model / "genai_config.json").write_text("{}")
    (model / "model.onnx").write_bytes(weights)
    (model / "manifest.json").write_text(json.dumps({
        "created": "now", "stages": {"export": {"key": "k1", "sha256": "abc"}},
        "inputs": {"train_source": {"uri": "pkg:x", "sha256": "def"}},
        "config": {"export": {"precision": "int4"}, "model": {"name_or_path": "tiny"}}}))
    return model


def test_register_a_model_folder_in_an_mlflow_registry_once(tmp_path):
    """`slmflow.azureml.register`'s path, on a local SQLite store: one version, tagged with
    every file's hash and the manifest's; the same folder again is that version."""
    from mlflow import MlflowClient

    from slmflow.azureml.register import EXPERIMENT, register_exported_model
    from slmflow.registry import content_sha256, file_hashes

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(tmp_path / "art").as_uri())
    model = _model_folder(tmp_path / "a")
    assert register_exported_model(model, "tone-int4", uri) == "tone-int4:1"
    (model / "manifest.json").write_text((model / "manifest.json").read_text().replace("now", "later"))
    assert register_exported_model(model, "tone-int4", uri) == "tone-int4:1"  # same content
    other = _model_folder(tmp_path / "b", b"other-weights")
    assert register_exported_model(other, "tone-int4", uri) == "tone-int4:2"

    [version] = MlflowClient(uri).search_model_versions("name = 'tone-int4' and version_number = 1")
    files = file_hashes(model)
    assert version.tags["slmflow.content_sha256"] == content_sha256(files)
    assert version.tags["slmflow.file.model.onnx"] == files["model.onnx"]
    assert version.tags["slmflow.export.sha256"] == "abc"
    assert version.tags["slmflow.input.train_source.sha256"] == "def"
    assert version.tags["slmflow.precision"] == "int4"
    assert (tmp_path / "art").is_dir() and any((tmp_path / "art").rglob("model.onnx"))
    with pytest.raises(ConfigError, match=r"not an exported slmflow model"):
        register_exported_model(tmp_path, "x", uri)


def test_the_mlflow_run_ends_with_the_pipelines_outcome(tmp_path, capsys):
    """FINISHED, FAILED (an error, or logging that failed: one line, outputs kept), KILLED
    (Ctrl-C, SIGTERM); named by the template; the config as params (a local SQLite store)."""
    from mlflow import MlflowClient

    from slmflow.tracking import tracked
    from slmflow.tracking_values import flatten

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    config = _config(f"tracking.uri={uri}", "tracking.experiment=t", f"output_dir={tmp_path / 'out'}",
                     "tracking.run_name={output_name}-{flow_run_id}-{recipe}")
    with pytest.raises(RuntimeError), tracked(config):
        raise RuntimeError("a stage failed")
    with pytest.raises(KeyboardInterrupt), tracked(config):
        raise KeyboardInterrupt
    with tracked(config) as run:
        run.log_outcome({}, tmp_path / "out" / "report.json", tmp_path / "out" / "model")
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"tracking: logging to MLflow run {run.run_id} failed (KeyError")
    with tracked(config):
        pass
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "KILLED", "FAILED", "FINISHED"]
    assert runs[-1].info.run_name == "out-local-manual"
    assert runs[-1].data.params == flatten(config.model_dump(mode="json"))
