"""Against a real AzureML workspace: run only where credentials and a workspace are given.

    SLMFLOW_TEST_AZUREML_SUBSCRIPTION_ID, SLMFLOW_TEST_AZUREML_RESOURCE_GROUP,
    SLMFLOW_TEST_AZUREML_WORKSPACE, SLMFLOW_TEST_AZUREML_COMPUTE   the workspace and a CPU cluster
    AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, or `az login`   the identity
    .venv/bin/python -m pytest -m azureml tests/azureml

It submits a short command job in the azureml worker's environment (echo, not a flow run), follows
it to Completed, and submits a second one and cancels it.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.azureml
NAMES = ("SLMFLOW_TEST_AZUREML_SUBSCRIPTION_ID", "SLMFLOW_TEST_AZUREML_RESOURCE_GROUP",
         "SLMFLOW_TEST_AZUREML_WORKSPACE", "SLMFLOW_TEST_AZUREML_COMPUTE")
CREDS = ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET")
REPO = Path(__file__).resolve().parents[2]

if not all(os.environ.get(n) for n in NAMES) or not (
        all(os.environ.get(c) for c in CREDS) or (Path.home() / ".azure" / "msal_token_cache.json").exists()):
    pytest.skip(f"needs {', '.join(NAMES)} and Azure credentials ({', '.join(CREDS)} or az login)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def client():
    from slmflow.azureml.client import AzureMLClient, Workspace

    return AzureMLClient(Workspace(*(os.environ[n] for n in NAMES[:3])))


def _job(command: str):
    from azure.ai.ml import command as aml_command
    from azure.ai.ml.entities import Environment

    return aml_command(
        name=f"slmflow-test-{uuid.uuid4().hex[:10]}", command=command, experiment_name="slmflow-tests",
        compute=os.environ["SLMFLOW_TEST_AZUREML_COMPUTE"],
        environment=Environment(image="mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"),
    )._to_job()


def _wait(client, name: str, timeout: float = 1800) -> str:
    from slmflow.azureml.client import TERMINAL

    deadline = time.monotonic() + timeout
    while (status := client.status(name)) not in TERMINAL:
        assert time.monotonic() < deadline, f"{name} still {status}"
        time.sleep(15)
    return status


def test_submit_follow_and_cancel_a_job(client):
    done = client.submit(_job("echo slmflow"))
    assert done.studio_url
    assert _wait(client, done.name) == "Completed"
    running = client.submit(_job("sleep 900"))
    client.cancel(running.name)
    assert _wait(client, running.name) == "Canceled"
