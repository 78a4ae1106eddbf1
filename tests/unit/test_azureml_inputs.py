"""Azure inputs and the shared stage store, with fakes at the SDK boundary and a file:// remote:
registry models and datastore files (config shape checked without network), and two working
directories reusing each other's stages through cache_remote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmflow.config import PipelineConfig
from slmflow.errors import ConfigError


@pytest.mark.parametrize(("config", "message"), [
    ({"model": {"name_or_path": "azureml://registries/r/models/m/versions/1"}},
     r"is an AzureML reference: set model.source=azureml_registry"),
    ({"model": {"source": "azureml_registry", "name_or_path": "azureml://registries/r/models/m"}},
     r"is not an AzureML registry model; write azureml://registries/<registry>/models/<name>/versions/<version>"),
    ({"data": {"train_file": "azureml://datastores/workspaceblobstore/paths/"}},
     r"data.train_file: .* is not an AzureML datastore file; write azureml://datastores/"),
    ({"data": {"eval_file": "azureml://datastores/x"}}, r"data.eval_file: .* is not an AzureML datastore file"),
    ({"cache_remote": "my-container"}, r"cache_remote: 'my-container' is not a storage URL; write e.g. az://"),
])
def test_azure_references_are_checked_for_shape_without_network(config, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig.model_validate(config)


def test_registry_model_is_keyed_by_its_uri_and_downloaded_by_the_stage(tmp_path, monkeypatch):
    from slmflow.azureml import inputs
    from slmflow.inputs import model_source
    from slmflow.stage import run_stage
    from slmflow.stages.base_model import STAGE
    from slmflow.store import Store

    cfg = PipelineConfig.model_validate({"model": {
        "source": "azureml_registry", "name_or_path": "azureml://registries/azureml-msr/models/phi/versions/11"}}).model
    old = PipelineConfig.model_validate({"model": {
        "source": "azureml_registry", "name_or_path": "phi", "registry_name": "azureml-msr", "version": "11"}}).model
    assert model_source(cfg).sha256 == model_source(old).sha256  # the same model
    calls = []

    class FakeRegistry:
        def __init__(self, workspace=None, registry_name=None):
            calls.append(registry_name)

        def download_registry_model(self, name, version, dest):
            calls.append((name, version))
            folder = Path(dest) / name / "mlflow_model_folder" / "data" / "model"  # MLflow layout
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"]}))
            (folder / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(inputs, "_client", lambda factory, **kw: FakeRegistry(**kw))
    monkeypatch.setattr("slmflow.folders.describe_model", lambda folder: {"files": sorted(
        p.name for p in folder.iterdir())})
    ref = run_stage(STAGE, cfg, Store.at(tmp_path / "store"), source=model_source(cfg),
                    log=lambda m: None)
    assert calls == ["azureml-msr", ("phi", "11")]
    assert ref.meta["files"] == ["config.json", "model.safetensors"]
    assert (ref.path / "model" / "config.json").is_file()


def test_registry_download_errors_name_the_model_and_the_fix(tmp_path, monkeypatch):
    from slmflow.azureml import inputs

    class Denied:
        def download_registry_model(self, *a):
            raise RuntimeError("ClientAuthenticationError: no credential")

    cfg = PipelineConfig.model_validate({"model": {
        "source": "azureml_registry", "name_or_path": "azureml://registries/r/models/m/versions/2"}}).model
    monkeypatch.setattr(inputs, "_client", lambda factory, **kw: Denied())
    with pytest.raises(inputs.AzureInputError, match=r"could not download azureml://registries/r/"
                                                      r"models/m/versions/2 .* check the name, version "
                                                      r"and your Azure login") as err:
        inputs.download_registry_model(cfg, tmp_path / "model", log=lambda m: None)
    assert err.value.retryable


def test_datastore_file_is_downloaded_and_keyed_by_content(tmp_path, monkeypatch):
    from slmflow.azureml import inputs
    from slmflow.inputs import data_source
    from slmflow.store import Store

    content = {"v": '{"phrase": "hi", "tone": "Joy"}\n'}
    seen = []

    class FakeDatastore:
        def __init__(self, workspace=None):
            seen.append(workspace)

        def download_datastore_path(self, uri, dest):
            (Path(dest) / "tones.jsonl").write_text(content["v"])

    monkeypatch.setattr(inputs, "_client", lambda factory, **kw: FakeDatastore(**kw))
    spec = ("azureml://subscriptions/s1/resourcegroups/rg1/workspaces/ws1/datastores/"
            "workspaceblobstore/paths/data/tones.jsonl")
    first = data_source(spec, "data.train_file", Store.at(tmp_path))
    assert Path(first.uri).read_text() == content["v"] and seen[0].workspace == "ws1"
    content["v"] = '{"phrase": "oh no", "tone": "Fear"}\n'
    assert data_source(spec, "data.train_file", Store.at(tmp_path)).sha256 != first.sha256


def test_short_datastore_uri_needs_the_workspace(tmp_path, monkeypatch):
    from slmflow.azureml.inputs import download_datastore_file

    for var in ("SLMFLOW_AZUREML_SUBSCRIPTION_ID", "SLMFLOW_AZUREML_RESOURCE_GROUP",
                "SLMFLOW_AZUREML_WORKSPACE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"data.train_file: an azureml://datastores/... path needs "
                                          r"the workspace: set SLMFLOW_AZUREML_SUBSCRIPTION_ID"):
        download_datastore_file("azureml://datastores/ds/paths/a.jsonl", "data.train_file", tmp_path)


# ---- the shared stage store -------------------------------------------------------------------
def _build(counter: list):
    def build(out: Path, work: Path):
        counter.append(1)
        (out / "weights.bin").write_bytes(b"w" * 100)
        (out / "sub").mkdir()
        (out / "sub" / "meta.json").write_text("{}")
        return {"n": 1}
    return build


def test_two_working_directories_share_stage_outputs_through_the_remote(tmp_path):
    from slmflow.stage import stage_key
    from slmflow.store import Store

    remote = f"file://{tmp_path / 'remote'}"
    a, b = tmp_path / "wd-a" / "cache", tmp_path / "wd-b" / "cache"
    assert stage_key("s", 1, {"x": 1}, [], Store.at(a)) != stage_key(
        "s", 1, {"x": 1}, [], Store.at(b, remote))  # the remote is part of the key
    a, b = Store.at(a, remote), Store.at(b, remote)
    key_a, key_b = stage_key("s", 1, {"x": 1}, [], a), stage_key("s", 1, {"x": 1}, [], b)
    assert key_a == key_b  # with a shared remote: the same key
    built: list = []
    first = a.build("adapter", key_a, [], _build(built), log=lambda m: None)
    assert not first.cached and built == [1]
    assert (tmp_path / "remote" / "adapter" / key_a / "slmflow-artifact.json").is_file()
    logs: list[str] = []
    second = b.build("adapter", key_b, [], _build(built), log=logs.append)
    assert second.cached and built == [1] and second.sha256 == first.sha256
    assert second.path == b.folder("adapter", key_b) and (second.path / "sub" / "meta.json").is_file()
    assert any("reused from file://" in m for m in logs)

    # A remote copy that no longer matches its manifest is not trusted: the stage rebuilds.
    (tmp_path / "remote" / "adapter" / key_a / "weights.bin").write_bytes(b"tampered")
    c = Store.at(tmp_path / "wd-c" / "cache", remote)
    logs.clear()
    third = c.build("adapter", key_a, [], _build(built), log=logs.append)
    assert built == [1, 1] and not third.cached and third.sha256 == first.sha256
    assert any("does not match its manifest; rebuilding" in m for m in logs)
