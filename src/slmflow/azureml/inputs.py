"""Inputs from Azure: a base model from an AzureML registry, a data file from a datastore, and
Key Vault secrets: the `azureml` and `keyvault` schemes of `slmflow.inputs` (entry points
`slmflow.schemes` in pyproject.toml; slmflow's core never imports this package).

Both are downloaded (with the ambient Azure identity: the compute's managed identity inside an
AzureML job, `az login` or AZURE_* variables elsewhere) and then used like local inputs: a data
file is keyed by its content, so new content at the same datastore path gives a new key; a
registry model version is immutable, so its URI is its key (as a hub id and revision are).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef, named_ref, stable_hash
from slmflow.errors import ConfigError, SlmflowError
from slmflow.uris import RegistryModel, parse_datastore_path, parse_keyvault, parse_registry_model

ClientFactory = Callable[..., Any]


class AzureInputError(SlmflowError):
    """Azure could not give an input (auth, network, not found): may pass on a retry."""

    retryable = True


def _client(factory: ClientFactory | None, **kwargs: Any) -> Any:
    if factory is not None:
        return factory(**kwargs)
    from slmflow.azureml.client import AzureMLClient

    return AzureMLClient(**kwargs)


def registry_model(cfg: Any) -> RegistryModel:
    """The registry model a BaseModelConfig (source=azureml_registry) names."""
    if cfg.name_or_path.startswith("azureml:"):
        return parse_registry_model(cfg.name_or_path)
    return RegistryModel(cfg.registry_name, cfg.name_or_path, str(cfg.version))


def find_model_folder(root: Path) -> Path:
    """The transformers folder (config.json + safetensors) inside a downloaded registry model.

    MLflow-format models (the seed's `PyTorch.MLflow`) keep it under data/model or similar.
    """
    candidates = sorted(
        (p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors"))),
        key=lambda p: len(p.parts),
    )
    if not candidates:
        raise ConfigError(
            f"model.name_or_path: the registry model downloaded to {root} holds no transformers "
            "folder with config.json and .safetensors weights; register the model in that format"
        )
    return candidates[0]


def _summary(exc: Exception) -> str:
    """An SDK error in one line: its type and the first line of its message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no message'}"


def download_registry_model(cfg: Any, target: Path, log: Callable[[str], None] = print,
                            client_factory: ClientFactory | None = None) -> Path:
    """Download the registry model into `target` (a transformers folder)."""
    model = registry_model(cfg)
    log(f"downloading {model.uri}")
    scratch = target.parent / f".download-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True)
    try:
        client = _client(client_factory, workspace=None, registry_name=model.registry)
        try:
            client.download_registry_model(model.name, model.version, scratch)
        except Exception as exc:  # noqa: BLE001 - azure-core's error types, auth and network
            raise AzureInputError(
                f"model.name_or_path: could not download {model.uri} ({_summary(exc)}); check the name, "
                "version and your Azure login (az login, or the compute's managed identity)"
            ) from None
        shutil.copytree(find_model_folder(scratch), target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def download_datastore_file(spec: str, field: str, store: Path,
                            client_factory: ClientFactory | None = None) -> Path:
    """Download an azureml://datastores/... file into STORE/azureml-inputs/ and return its path.

    Downloaded on every run (the datastore may hold new content at the same path); the data
    stages then key it by content.
    """
    from slmflow.azureml.client import Workspace, workspace_from_env

    ds = parse_datastore_path(spec, field)
    ws = (Workspace(ds.subscription, ds.resource_group, ds.workspace) if ds.subscription
          else workspace_from_env(field))
    folder = Path(store) / "azureml-inputs" / stable_hash({"uri": spec})[:16]
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        try:
            _client(client_factory, workspace=ws).download_datastore_path(spec, tmp)
        except Exception as exc:  # noqa: BLE001 - azure-core's error types, auth and network
            raise AzureInputError(
                f"{field}: could not download {spec} from workspace {ws.workspace} "
                f"({_summary(exc)}); "
                "check the datastore, the path and your Azure login"
            ) from None
        name = Path(ds.path).name
        if not (tmp / name).is_file():
            raise ConfigError(f"{field}: {spec} names no file in datastore {ds.datastore}; "
                              "check the path (a folder is not accepted)")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / name


class AzureMLScheme:
    """`azureml://` models and data, `keyvault://` secrets (see `slmflow.inputs.Scheme`)."""

    def model_ref(self, cfg: Any) -> ArtifactRef:
        uri = registry_model(cfg).uri  # a registry model version never changes: its URI is its key
        return named_ref("model_source", uri, {"azureml_registry_model": uri})

    def download_model(self, cfg: Any, target: Path, log: Callable[[str], None]) -> None:
        download_registry_model(cfg, target, log)

    def data_file(self, spec: str, field: str, into: Path) -> Path:
        return download_datastore_file(spec, field, into)

    def secret(self, ref: str, field: str) -> str:
        from slmflow.azureml.launch import keyvault_fetch

        return keyvault_fetch(parse_keyvault(ref, field))


SCHEME = AzureMLScheme()
