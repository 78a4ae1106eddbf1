"""The Azure SDK boundary: everything slmflow asks of AzureML goes through `AzureMLClient`.

Tests give the worker and the input resolvers a fake with the same methods; nothing else in
slmflow imports `azure.ai.ml.MLClient`. Credentials: `make_credential` is a
`DefaultAzureCredential` (environment, workload identity, Azure CLI, ...) that probes the managed
identity endpoint only where one exists: inside an AzureML job, or where
`SLMFLOW_AZURE_MANAGED_IDENTITY=1` says so (an Azure VM running the worker). Off Azure the probe of
169.254.169.254 only costs time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# AzureML job statuses (azure.ai.ml.operations._run_history_constants.JobStatus).
TERMINAL = {"Completed", "Failed", "Canceled"}


@dataclass(frozen=True)
class SubmittedJob:
    name: str
    studio_url: str | None = None
    status: str | None = None


@dataclass(frozen=True)
class Workspace:
    subscription_id: str
    resource_group: str
    workspace: str


class JobsClient(Protocol):
    """What the worker needs: submit a command job, read its status, cancel it."""

    def submit(self, job: Any) -> SubmittedJob: ...

    def status(self, name: str) -> str: ...

    def cancel(self, name: str) -> None: ...


def in_azureml_job() -> bool:
    """True inside an AzureML job (the compute's managed identity is there)."""
    return bool(os.environ.get("AZUREML_RUN_ID"))


def make_credential(managed_identity: bool | None = None) -> Any:
    """A DefaultAzureCredential; the managed identity probe only where it can answer."""
    from azure.identity import DefaultAzureCredential

    if managed_identity is None:
        managed_identity = in_azureml_job() or os.environ.get("SLMFLOW_AZURE_MANAGED_IDENTITY") == "1"
    kwargs: dict[str, Any] = {"exclude_managed_identity_credential": not managed_identity}
    if managed_identity and os.environ.get("DEFAULT_IDENTITY_CLIENT_ID"):
        # AzureML sets this on compute with a user-assigned identity.
        kwargs["managed_identity_client_id"] = os.environ["DEFAULT_IDENTITY_CLIENT_ID"]
    return DefaultAzureCredential(**kwargs)


class AzureMLClient:
    """A thin wrapper around `azure.ai.ml.MLClient` for one workspace (or one registry)."""

    def __init__(self, workspace: Workspace | None, credential: Any = None,
                 registry_name: str | None = None) -> None:
        self.workspace = workspace
        self.registry_name = registry_name
        self._credential = credential
        self._ml = None

    @property
    def ml(self) -> Any:
        if self._ml is None:
            from azure.ai.ml import MLClient

            ws = self.workspace
            self._ml = MLClient(
                self._credential or make_credential(),
                subscription_id=ws.subscription_id if ws else None,
                resource_group_name=ws.resource_group if ws else None,
                workspace_name=ws.workspace if ws and not self.registry_name else None,
                registry_name=self.registry_name,
            )
        return self._ml

    # -- jobs (the worker) -------------------------------------------------------------------
    def submit(self, job: Any) -> SubmittedJob:
        created = self.ml.jobs.create_or_update(job)
        return SubmittedJob(name=created.name, studio_url=getattr(created, "studio_url", None),
                            status=getattr(created, "status", None))

    def status(self, name: str) -> str:
        return str(self.ml.jobs.get(name).status)

    def cancel(self, name: str) -> None:
        self.ml.jobs.begin_cancel(name).result(timeout=120)

    # -- inputs (the stages) -----------------------------------------------------------------
    def download_registry_model(self, name: str, version: str, dest: Path) -> Path:
        """Download a registry model's files into `dest` (needs registry_name)."""
        self.ml.models.download(name=name, version=version, download_path=str(dest))
        return dest

    def download_datastore_path(self, uri: str, dest: Path) -> Path:
        """Download what an `azureml://datastores/<ds>/paths/<path>` URI names into `dest`."""
        from azure.ai.ml._artifacts._artifact_utilities import download_artifact_from_aml_uri

        return Path(download_artifact_from_aml_uri(uri, str(dest), self.ml.datastores))

    def mlflow_tracking_uri(self) -> str:
        """The workspace's MLflow tracking URI (azureml://...): its runs and its model list."""
        return self.ml.workspaces.get(self.workspace.workspace).mlflow_tracking_uri


def workspace_from_env(field: str) -> Workspace:
    """The workspace of SLMFLOW_AZUREML_SUBSCRIPTION_ID, _RESOURCE_GROUP, _WORKSPACE (the worker
    sets them in its jobs)."""
    from slmflow.errors import ConfigError

    names = ("SLMFLOW_AZUREML_SUBSCRIPTION_ID", "SLMFLOW_AZUREML_RESOURCE_GROUP",
             "SLMFLOW_AZUREML_WORKSPACE")
    values = [os.environ.get(n) for n in names]
    if not all(values):
        missing = [n for n, v in zip(names, values, strict=True) if not v]
        raise ConfigError(
            f"{field}: an azureml://datastores/... path needs the workspace: set {', '.join(missing)} "
            "(the azureml worker sets them in the job), or write the long form "
            "azureml://subscriptions/S/resourcegroups/R/workspaces/W/datastores/D/paths/P"
        )
    return Workspace(*values)  # type: ignore[arg-type]
