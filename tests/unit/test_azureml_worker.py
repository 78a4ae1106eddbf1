"""The azureml worker against a fake AzureML client: submission, status streaming, failure,
cancellation. Nothing here reaches the network or a Prefect server (the Prefect client is a
fake too)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from slmflow.azureml.client import SubmittedJob

REPO = Path(__file__).resolve().parents[2]


class FakeAzureML:
    """The JobsClient boundary: a job walks through `statuses`, one per status read."""

    def __init__(self, statuses: list[str], after_cancel: list[str] | None = None):
        self.statuses = list(statuses)
        self.after_cancel = after_cancel or ["CancelRequested", "Canceled"]
        self.submitted: list = []
        self.cancelled: list[str] = []
        self.reads = 0

    def submit(self, job):
        self.submitted.append(job)
        return SubmittedJob(name=job.name, studio_url=f"https://ml.azure.com/runs/{job.name}",
                            status="Starting")

    def status(self, name):
        self.reads += 1
        if self.cancelled and self.after_cancel:
            return self.after_cancel.pop(0) if len(self.after_cancel) > 1 else self.after_cancel[0]
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def cancel(self, name):
        self.cancelled.append(name)


class FakePrefect:
    """The worker's Prefect client: the flow run's state, and the states the worker sets."""

    def __init__(self, flow_run, cancel_after_reads: int | None = None):
        self.flow_run = flow_run
        self.cancel_after_reads = cancel_after_reads
        self.reads = 0
        self.set_states: list = []

    async def read_flow_run(self, flow_run_id):
        from prefect.states import Cancelling, Running

        self.reads += 1
        cancelling = self.cancel_after_reads is not None and self.reads >= self.cancel_after_reads
        state = self.set_states[-1] if self.set_states else (Cancelling() if cancelling else Running())
        return self.flow_run.model_copy(update={"state": state})

    async def set_flow_run_state(self, flow_run_id, state, force=False):
        self.set_states.append(state)
        return SimpleNamespace(state=state)


class Started:
    def __init__(self):
        self.value = None

    def started(self, value=None):
        self.value = value


@pytest.fixture(autouse=True)
def no_azure(monkeypatch):
    import azure.identity

    def refuse(**kwargs):
        raise AssertionError("DefaultAzureCredential must not be built in worker tests")

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", refuse)


def make_worker(monkeypatch, fake_azure, fake_prefect, caplog):
    from slmflow.azureml.worker import AzureMLWorker

    monkeypatch.setattr(AzureMLWorker, "client_factory", staticmethod(lambda cfg: fake_azure))
    worker = AzureMLWorker(work_pool_name="aml-pool", name="worker-1")
    worker._client = fake_prefect
    logger = logging.getLogger(f"test.azureml.worker.{uuid.uuid4().hex[:6]}")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # only caplog's handler: Prefect's logging config varies by test order
    logger.addHandler(caplog.handler)
    monkeypatch.setattr(worker, "get_flow_run_logger", lambda flow_run: logger)
    crashed = []

    async def propose_crashed(flow_run, message, client=None):
        crashed.append(message)

    monkeypatch.setattr(worker, "_propose_crashed_state", propose_crashed)
    return worker, crashed


def prepared(monkeypatch, **values):
    from prefect.client.schemas.objects import FlowRun

    from slmflow.azureml.worker import AzureMLJobConfiguration, AzureMLWorker

    monkeypatch.setattr(AzureMLJobConfiguration, "_base_environment",
                        classmethod(lambda cls: {"PREFECT_API_URL": "https://prefect.example.com/api"}))
    values = {"subscription_id": "sub-1", "resource_group": "rg-1", "workspace": "ws-1",
              "compute": "gpu-cluster", "conda_file": str(REPO / "infra/azureml/conda.yaml"),
              "poll_seconds": 0.001, **values}
    cfg = asyncio.run(AzureMLJobConfiguration.from_template_and_values(
        AzureMLWorker.get_default_base_job_template(), values, client=object()))
    flow_run = FlowRun(id=uuid.uuid4(), name="brave-fox", flow_id=uuid.uuid4())
    cfg.prepare_for_flow_run(flow_run, worker_name="worker-1")
    return cfg, flow_run


def test_submission_and_status_streaming_to_completion(monkeypatch, caplog):
    fake = FakeAzureML(["Queued", "Preparing", "Running", "Running", "Finalizing", "Completed"])
    cfg, flow_run = prepared(monkeypatch)
    worker, crashed = make_worker(monkeypatch, fake, FakePrefect(flow_run), caplog)
    started = Started()

    result = asyncio.run(worker.run(flow_run, cfg, task_status=started))

    (job,) = fake.submitted
    assert job.compute == "gpu-cluster" and job.environment_variables["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert started.value == job.name == result.identifier  # the flow run's infrastructure_pid
    assert result.status_code == 0 and crashed == [] and fake.cancelled == []
    log = caplog.text
    assert f"AzureML job {job.name} submitted to compute gpu-cluster: https://ml.azure.com/runs/" in log
    transitions = [r.getMessage().split(": ", 1)[1] for r in caplog.records if "->" in r.getMessage()]
    assert transitions == ["Starting -> Queued", "Queued -> Preparing", "Preparing -> Running",
                           "Running -> Finalizing", "Finalizing -> Completed"]


def test_a_failed_job_crashes_the_flow_run_with_the_job_name_and_link(monkeypatch, caplog):
    fake = FakeAzureML(["Queued", "Running", "Failed"])
    cfg, flow_run = prepared(monkeypatch)
    worker, crashed = make_worker(monkeypatch, fake, FakePrefect(flow_run), caplog)

    result = asyncio.run(worker.run(flow_run, cfg, task_status=Started()))

    assert result.status_code == 1
    name = fake.submitted[0].name
    assert crashed == [(f"AzureML job {name} ended Failed (https://ml.azure.com/runs/{name}); its "
                        "logs (user_logs/std_log.txt) say why")]


def test_a_job_canceled_in_azure_crashes_the_flow_run(monkeypatch, caplog):
    fake = FakeAzureML(["Running", "Canceled"])
    cfg, flow_run = prepared(monkeypatch)
    worker, crashed = make_worker(monkeypatch, fake, FakePrefect(flow_run), caplog)
    assert asyncio.run(worker.run(flow_run, cfg, task_status=Started())).status_code == 1
    assert "ended Canceled" in crashed[0]


def test_cancelling_the_flow_run_cancels_the_azureml_job(monkeypatch, caplog):
    fake = FakeAzureML(["Queued", "Running"])
    cfg, flow_run = prepared(monkeypatch)
    prefect = FakePrefect(flow_run, cancel_after_reads=3)
    worker, crashed = make_worker(monkeypatch, fake, prefect, caplog)

    result = asyncio.run(worker.run(flow_run, cfg, task_status=Started()))

    name = fake.submitted[0].name
    assert fake.cancelled == [name]
    assert result.status_code == 0 and crashed == []
    assert prefect.set_states[-1].is_cancelled()
    assert f"AzureML job {name} canceled" in prefect.set_states[-1].message
    assert "flow run cancelled in Prefect: cancelling AzureML job" in caplog.text


def test_a_config_error_stops_before_submission(monkeypatch, caplog):
    from slmflow.errors import ConfigError

    fake = FakeAzureML(["Completed"])
    cfg, flow_run = prepared(monkeypatch, prefect_api_url="http://127.0.0.1:4200/api")
    worker, _ = make_worker(monkeypatch, fake, FakePrefect(flow_run), caplog)
    with pytest.raises(ConfigError, match="prefect_api_url"):
        asyncio.run(worker.run(flow_run, cfg, task_status=Started()))
    assert fake.submitted == []


def test_kill_infrastructure_cancels_the_named_job(monkeypatch, caplog):
    from azure.core.exceptions import ResourceNotFoundError
    from prefect.exceptions import InfrastructureNotFound

    fake = FakeAzureML(["Queued"])
    cfg, flow_run = prepared(monkeypatch)
    worker, _ = make_worker(monkeypatch, fake, FakePrefect(flow_run), caplog)
    asyncio.run(worker.kill_infrastructure("slmflow-abc-123456", cfg))
    assert fake.cancelled == ["slmflow-abc-123456"]

    def gone(name):
        raise ResourceNotFoundError("no such job")

    fake.cancel = gone
    with pytest.raises(InfrastructureNotFound, match="AzureML job slmflow-x not found"):
        asyncio.run(worker.kill_infrastructure("slmflow-x", cfg))
