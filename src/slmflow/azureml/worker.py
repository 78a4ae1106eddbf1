"""The `azureml` Prefect worker: each flow run of the pool runs as an AzureML command job.

Registered through the `prefect.collections` entry point (pyproject.toml), so once slmflow is
installed:
    prefect work-pool create gpu --type azureml
    prefect work-pool get-default-base-job-template --type azureml   # the job variables
    prefect worker start --pool gpu                                  # on any machine with az login

The worker builds the job (`slmflow.azureml.job`), submits it (`slmflow.azureml.client`), follows
its AzureML status (logged on the flow run), cancels it when the flow run is cancelled, and
reports an AzureML job that ends Failed or Canceled without the flow run having ended as Crashed
(with the job's name, status and studio link). This module imports no Azure SDK at import time:
Prefect loads it in every CLI call and in the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import anyio.abc
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)
from pydantic import Field, PrivateAttr

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

    from slmflow.azureml.client import JobsClient

DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04:latest"
DEFAULT_CONDA = "infra/azureml/conda.yaml"


def _fields() -> dict[str, Any]:
    """Title and description of every job variable (shared by the variables and the config)."""
    return {
        "subscription_id": {"title": "Subscription ID", "description": "Azure subscription of the "
                                "AzureML workspace."},
        "resource_group": {"title": "Resource group", "description": "Resource group of the "
                               "AzureML workspace."},
        "workspace": {"title": "Workspace", "description": "AzureML workspace name."},
        "compute": {"title": "Compute cluster", "description": "AzureML compute cluster the job "
                        "runs on (e.g. gpu-cluster); create it as infra/azureml/README.md shows."},
        "instance_count": {"title": "Instance count", "description": "Nodes of the cluster the job "
                               "takes. Above 1 the job gets a PyTorch distribution: the flow runs "
                               "once, on rank 0; every rank of every node takes part in the "
                               "fine-tune (data parallel; set cache_remote so that all nodes "
                               "share the stage store)."},
        "processes_per_instance": {"title": "Processes per instance", "description": "Processes "
                                       "per node of the PyTorch distribution (one per GPU). The "
                                       "flow runs in rank 0; the other ranks wait and join the "
                                       "fine-tune's process group."},
        "environment": {"title": "Registered environment", "description": "An AzureML environment "
                            "(e.g. azureml:slmflow:3 or slmflow@latest). When set, conda_file, "
                            "base_image and docker_context are not used."},
        "conda_file": {"title": "Conda file", "description": "Conda specification of the job's "
                           "environment, built on base_image (read on the worker; relative to "
                           "its working directory)."},
        "base_image": {"title": "Base image", "description": "Docker image the conda environment is "
                           "built on (GPU: an AzureML CUDA image)."},
        "docker_context": {"title": "Docker context", "description": "A folder with a Dockerfile to "
                               "build the environment from, instead of conda_file + base_image."},
        "code_dir": {"title": "Code folder", "description": "A local folder uploaded as the job's "
                         "code snapshot (its working directory). Empty: the deployment's pull "
                         "steps fetch the code (e.g. git_clone)."},
        "prefect_api_url": {"title": "Prefect API URL for the compute", "description": "The Prefect "
                                "API as the AzureML compute reaches it (never 127.0.0.1). Empty: "
                                "the worker's PREFECT_API_URL, if it is not a loopback address."},
        "prefect_api_key_secret": {"title": "Prefect API key (Key Vault)", "description": "Where "
                                       "the job reads PREFECT_API_KEY: keyvault://VAULT/SECRET. "
                                       "Needed when the API needs a key; the key itself is never "
                                       "written into the job."},
        "hf_token_secret": {"title": "Hugging Face token (Key Vault)", "description": "Where the job "
                                "reads HF_TOKEN: keyvault://VAULT/SECRET (or keep the token in "
                                "the Prefect Secret block hf-token, which the job reads too)."},
        "secret_env": {"title": "Secret environment variables", "description": "More secrets for "
                           "the job: VARIABLE: keyvault://VAULT/SECRET. Fetched at job start with "
                           "the compute's managed identity."},
        "job_name_prefix": {"title": "Job name prefix", "description": "AzureML job names are "
                                "PREFIX-<flow run id>-<6 hex>."},
        "experiment_name": {"title": "Experiment name", "description": "AzureML experiment the jobs "
                                "are grouped under."},
        "use_managed_identity": {"title": "Worker uses managed identity", "description": "Let the "
                                     "worker authenticate with the managed identity of the Azure "
                                     "VM it runs on (else: environment, Azure CLI login, ...)."},
        "poll_seconds": {"title": "Status poll interval", "description": "Seconds between AzureML "
                             "job status reads."},
    }


_F = _fields()


def _field(name: str, default: Any = ..., **kw: Any) -> Any:
    if "default_factory" in kw:
        return Field(**_F[name], **kw)
    return Field(default, **_F[name], **kw)


class AzureMLVariables(BaseVariables):
    """The job variables of an `azureml` work pool (the pool's form in the Prefect UI)."""

    name: str | None = Field(None, title="Display name", description="Display name of the "
                                "AzureML job (default: the flow run's name).")
    env: dict[str, str | None] = Field(
        default_factory=dict, title="Environment variables", description="Set in the job. A "
        "name that looks like a secret (HF_TOKEN, ..._KEY) must hold keyvault://VAULT/SECRET.")
    labels: dict[str, str] = Field(default_factory=dict, title="Tags",
                                   description="Tags of the AzureML job.")
    command: str | None = Field(None, title="Command", description="What the job runs after "
                                   "its secrets are fetched; leave empty (prefect flow-run execute).")
    subscription_id: str = _field("subscription_id")
    resource_group: str = _field("resource_group")
    workspace: str = _field("workspace")
    compute: str = _field("compute")
    instance_count: int = _field("instance_count", 1, ge=1)
    processes_per_instance: int = _field("processes_per_instance", 1, ge=1)
    environment: str | None = _field("environment", None)
    conda_file: str = _field("conda_file", DEFAULT_CONDA)
    base_image: str = _field("base_image", DEFAULT_IMAGE)
    docker_context: str | None = _field("docker_context", None)
    code_dir: str | None = _field("code_dir", None)
    prefect_api_url: str | None = _field("prefect_api_url", None)
    prefect_api_key_secret: str | None = _field("prefect_api_key_secret", None,
                                                   pattern=r"^keyvault://[^/]+/[^/]+$")
    hf_token_secret: str | None = _field("hf_token_secret", None,
                                            pattern=r"^keyvault://[^/]+/[^/]+$")
    secret_env: dict[str, str] = _field("secret_env", default_factory=dict)
    job_name_prefix: str = _field("job_name_prefix", "slmflow", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    experiment_name: str = _field("experiment_name", "slmflow")
    use_managed_identity: bool = _field("use_managed_identity", False)
    poll_seconds: float = _field("poll_seconds", 15.0, gt=0)


class AzureMLJobConfiguration(BaseJobConfiguration):
    """A flow run's job, after the pool's variables and the deployment's overrides are applied."""

    subscription_id: str = _field("subscription_id")
    resource_group: str = _field("resource_group")
    workspace: str = _field("workspace")
    compute: str = _field("compute")
    instance_count: int = _field("instance_count", 1, ge=1)
    processes_per_instance: int = _field("processes_per_instance", 1, ge=1)
    environment: str | None = _field("environment", None)
    conda_file: str = _field("conda_file", DEFAULT_CONDA)
    base_image: str = _field("base_image", DEFAULT_IMAGE)
    docker_context: str | None = _field("docker_context", None)
    code_dir: str | None = _field("code_dir", None)
    prefect_api_url: str | None = _field("prefect_api_url", None)
    prefect_api_key_secret: str | None = _field("prefect_api_key_secret", None)
    hf_token_secret: str | None = _field("hf_token_secret", None)
    secret_env: dict[str, str] = _field("secret_env", default_factory=dict)
    job_name_prefix: str = _field("job_name_prefix", "slmflow")
    experiment_name: str = _field("experiment_name", "slmflow")
    use_managed_identity: bool = _field("use_managed_identity", False)
    poll_seconds: float = _field("poll_seconds", 15.0, gt=0)

    _user_env: dict[str, str | None] = PrivateAttr(default_factory=dict)
    _worker_env: dict[str, str | None] = PrivateAttr(default_factory=dict)
    _flow_run_id: Any = PrivateAttr(None)

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        user_env = dict(self.env)
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name,
                                     worker_id=worker_id)
        self._user_env = user_env
        self._worker_env = {k: v for k, v in self.env.items() if k not in user_env}
        self._flow_run_id = flow_run.id

    def job_env(self) -> dict[str, str]:
        """The job's environment (refuses secrets in clear text and a loopback API URL)."""
        from slmflow.azureml.job import job_environment

        return job_environment(
            self._worker_env, self._user_env,
            prefect_api_url=self.prefect_api_url,
            prefect_api_key_secret=self.prefect_api_key_secret,
            hf_token_secret=self.hf_token_secret,
            secret_env=self.secret_env,
            workspace=(self.subscription_id, self.resource_group, self.workspace),
        )

    def build_job(self, suffix: str | None = None) -> Any:
        """The AzureML command job of the prepared flow run."""
        from slmflow.azureml.job import build_command_job

        if self._flow_run_id is None:
            raise RuntimeError("prepare_for_flow_run must be called before build_job")
        prepared = self.model_copy(update={"env": self.job_env()})
        return build_command_job(prepared, self._flow_run_id, suffix=suffix)


class AzureMLWorkerResult(BaseWorkerResult):
    """The AzureML job's name (identifier) and an exit status: 0 Completed or cancelled by us."""


def default_client(configuration: AzureMLJobConfiguration) -> JobsClient:
    from slmflow.azureml.client import AzureMLClient, Workspace, make_credential

    credential = make_credential(True if configuration.use_managed_identity else None)
    return AzureMLClient(Workspace(configuration.subscription_id, configuration.resource_group,
                                   configuration.workspace), credential=credential)


class AzureMLWorker(BaseWorker[AzureMLJobConfiguration, AzureMLVariables, AzureMLWorkerResult]):
    """Runs each flow run of its pool as an AzureML command job."""

    type = "azureml"
    job_configuration = AzureMLJobConfiguration
    job_configuration_variables = AzureMLVariables
    _description = ("Run flow runs as Azure Machine Learning command jobs on a compute cluster "
                    "(slmflow).")
    _display_name = "AzureML"
    _documentation_url = "https://learn.microsoft.com/azure/machine-learning/how-to-train-model"
    _logo_url = "https://raw.githubusercontent.com/Azure/azure-sdk-for-python/main/sdk/ml/azure-ai-ml/samples/media/azure-ml.png"

    # The SDK boundary: tests put a fake here.
    client_factory: ClassVar[Callable[[AzureMLJobConfiguration], JobsClient]] = staticmethod(
        default_client
    )

    async def run(
        self,
        flow_run: FlowRun,
        configuration: AzureMLJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> AzureMLWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        job = configuration.build_job()  # config errors surface here: the run is marked Crashed
        client = type(self).client_factory(configuration)
        submitted = await anyio.to_thread.run_sync(client.submit, job)
        logger.info(f"AzureML job {submitted.name} submitted to compute {configuration.compute}"
                    + (f": {submitted.studio_url}" if submitted.studio_url else ""))
        if task_status is not None:
            task_status.started(submitted.name)
        status, cancelled_by_prefect = await self._follow(flow_run, configuration, client,
                                                          submitted, logger)
        return await self._report(flow_run, submitted, status, cancelled_by_prefect, logger)

    async def _follow(self, flow_run, configuration, client, submitted, logger) -> tuple[str, bool]:
        """Log each AzureML status change until the job ends; cancel it when Prefect cancels."""
        from slmflow.azureml.client import TERMINAL

        last = submitted.status
        cancel_sent = False
        while True:
            status = await anyio.to_thread.run_sync(client.status, submitted.name)
            if status != last:
                logger.info(f"AzureML job {submitted.name}: {last or 'submitted'} -> {status}")
                last = status
            if status in TERMINAL:
                return status, cancel_sent
            if not cancel_sent and await self._prefect_cancelling(flow_run.id):
                logger.info(f"flow run cancelled in Prefect: cancelling AzureML job {submitted.name}")
                await anyio.to_thread.run_sync(client.cancel, submitted.name)
                cancel_sent = True
            await anyio.sleep(configuration.poll_seconds)

    async def _prefect_cancelling(self, flow_run_id: Any) -> bool:
        run = await self.client.read_flow_run(flow_run_id)
        return run.state is not None and (run.state.is_cancelling() or run.state.is_cancelled())

    async def _report(self, flow_run, submitted, status, cancelled_by_prefect, logger
                      ) -> AzureMLWorkerResult:
        """AzureML's final status → the flow run's state and the worker's exit status."""
        link = f" ({submitted.studio_url})" if submitted.studio_url else ""
        if status == "Completed":
            return AzureMLWorkerResult(identifier=submitted.name, status_code=0)
        if status == "Canceled" and (cancelled_by_prefect or await self._prefect_cancelling(flow_run.id)):
            current = await self.client.read_flow_run(flow_run.id)
            if current.state is None or not current.state.is_cancelled():
                await self._mark_flow_run_as_cancelled(current, {
                    "message": f"AzureML job {submitted.name} canceled{link}"})
            logger.info(f"AzureML job {submitted.name} canceled; flow run cancelled")
            return AzureMLWorkerResult(identifier=submitted.name, status_code=0)
        message = (f"AzureML job {submitted.name} ended {status}{link}; its logs (user_logs/"
                   "std_log.txt) say why")
        logger.error(message)
        # Where the flow run already ended (the flow itself failed), Prefect keeps that state.
        await self._propose_crashed_state(flow_run, message)
        return AzureMLWorkerResult(identifier=submitted.name, status_code=1)

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: AzureMLJobConfiguration,
        grace_seconds: int = 30,
    ) -> None:
        """Cancel the AzureML job named `infrastructure_pid` (a flow run cancelled before it ran)."""
        from prefect.exceptions import InfrastructureNotFound

        client = type(self).client_factory(configuration)
        try:
            await anyio.to_thread.run_sync(client.cancel, infrastructure_pid)
        except Exception as exc:
            if type(exc).__name__ == "ResourceNotFoundError":
                raise InfrastructureNotFound(f"AzureML job {infrastructure_pid} not found") from exc
            raise
