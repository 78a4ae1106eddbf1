"""URI shapes a config may hold, parsed and checked without network (no I/O here).

A shared stage store (`cache_remote`): any fsspec URL, e.g. az://CONTAINER/PREFIX.

Registry model (the seed's `azureml_registry_model`):
    azureml://registries/<registry>/models/<name>/versions/<version>
Datastore path (the seed's `azureml_datastore`):
    azureml://datastores/<datastore>/paths/<path>
    azureml://subscriptions/<sub>/resourcegroups/<rg>/workspaces/<ws>/datastores/<ds>/paths/<path>
Key Vault secret (for job variables and `SLMFLOW_SECRET_<VAR>`):
    keyvault://<vault-name>/<secret-name>
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slmflow.errors import ConfigError

REGISTRY_MODEL = re.compile(r"^azureml://registries/([^/]+)/models/([^/]+)/versions/([^/]+)$")
DATASTORE_PATH = re.compile(
    r"^azureml://(?:subscriptions/(?P<sub>[^/]+)/resource[gG]roups/(?P<rg>[^/]+)/"
    r"workspaces/(?P<ws>[^/]+)/)?datastores/(?P<ds>[^/]+)/paths/(?P<path>.+)$"
)
KEYVAULT = re.compile(r"^keyvault://([A-Za-z0-9-]{3,24})/([A-Za-z0-9-]{1,127})$")


@dataclass(frozen=True)
class RegistryModel:
    registry: str
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"azureml://registries/{self.registry}/models/{self.name}/versions/{self.version}"


@dataclass(frozen=True)
class DatastorePath:
    datastore: str
    path: str
    subscription: str | None = None
    resource_group: str | None = None
    workspace: str | None = None

    @property
    def uri(self) -> str:
        return f"azureml://datastores/{self.datastore}/paths/{self.path}"


@dataclass(frozen=True)
class KeyVaultSecret:
    vault: str
    name: str

    @property
    def vault_url(self) -> str:
        return f"https://{self.vault}.vault.azure.net"


def check_remote_uri(uri: str, field: str = "cache_remote") -> str:
    """Shape only: an fsspec URL with a scheme and a path (without the trailing slash)."""
    if "://" not in uri or not uri.split("://", 1)[1].strip("/"):
        raise ConfigError(
            f"{field}: {uri!r} is not a storage URL; write e.g. az://CONTAINER/PREFIX (Azure Blob), "
            "or file:///shared/slmflow-cache for a shared folder"
        )
    return uri.rstrip("/")


def parse_registry_model(spec: str, field: str = "model.name_or_path") -> RegistryModel:
    m = REGISTRY_MODEL.match(spec)
    if not m:
        raise ConfigError(
            f"{field}: {spec!r} is not an AzureML registry model; write "
            "azureml://registries/<registry>/models/<name>/versions/<version> "
            "(e.g. azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15)"
        )
    return RegistryModel(*m.groups())


def parse_datastore_path(spec: str, field: str) -> DatastorePath:
    m = DATASTORE_PATH.match(spec)
    if not m or m["path"].endswith("/"):
        raise ConfigError(
            f"{field}: {spec!r} is not an AzureML datastore file; write "
            "azureml://datastores/<datastore>/paths/<path/to/file.jsonl> "
            "(the workspace comes from SLMFLOW_AZUREML_SUBSCRIPTION_ID, SLMFLOW_AZUREML_RESOURCE_GROUP, "
            "SLMFLOW_AZUREML_WORKSPACE, set by the azureml worker, or the long form "
            "azureml://subscriptions/S/resourcegroups/R/"
            "workspaces/W/datastores/D/paths/P)"
        )
    return DatastorePath(m["ds"], m["path"], m["sub"], m["rg"], m["ws"])


def parse_keyvault(ref: str, field: str) -> KeyVaultSecret:
    m = KEYVAULT.match(ref)
    if not m:
        raise ConfigError(
            f"{field}: {ref!r} is not a Key Vault secret reference; write "
            "keyvault://<vault-name>/<secret-name> (the value itself never goes into the job)"
        )
    return KeyVaultSecret(*m.groups())
