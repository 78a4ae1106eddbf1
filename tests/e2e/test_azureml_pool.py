"""The `azureml` work pool on a real Prefect server (127.0.0.1, a free port, a temporary
PREFECT_HOME): created from the CLI, and flow runs of a deployment on it submitted by the worker to
a fake AzureML (the SDK boundary): failure → Crashed, cancellation → the job cancelled and the run
Cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from slmflow.azureml.client import SubmittedJob

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui", "--no-services"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_work_pool_create_type_azureml_from_the_cli(server):
    created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "aml-gpu", "--type",
                              "azureml"], env=server, capture_output=True, text=True, timeout=120,
                             check=False)
    assert created.returncode == 0, created.stdout + created.stderr
    pool = httpx.get(f"{server['PREFECT_API_URL']}/work_pools/aml-gpu").json()
    assert pool["type"] == "azureml"
    props = pool["base_job_template"]["variables"]["properties"]
    assert props["compute"]["title"] == "Compute cluster"
    assert props["conda_file"]["default"] == "infra/azureml/conda.yaml"
    assert set(pool["base_job_template"]["variables"]["required"]) == {
        "subscription_id", "resource_group", "workspace", "compute"}


class FakeAzureML:
    def __init__(self, statuses, on_read=None):
        self.statuses, self.on_read = list(statuses), on_read
        self.submitted, self.cancelled, self.reads = [], [], 0

    def submit(self, job):
        self.submitted.append(job)
        return SubmittedJob(name=job.name, studio_url=f"https://ml.azure.com/runs/{job.name}")

    def status(self, name):
        self.reads += 1
        if self.on_read:
            self.on_read(self.reads)
        if self.cancelled:
            return "Canceled"
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def cancel(self, name):
        self.cancelled.append(name)


async def _flow_run(pool: str) -> str:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        flow_id = await client.create_flow_from_name("slmflow-pipeline")
        deployment_id = await client.create_deployment(
            flow_id, "aml", work_pool_name=pool, entrypoint="flows.pipeline.slmflow_pipeline",
            job_variables={"subscription_id": "sub-1", "resource_group": "rg-1",
                           "workspace": "ws-1", "compute": "gpu-cluster",
                           "conda_file": str(REPO / "infra/azureml/conda.yaml"),
                           "prefect_api_url": "https://prefect.example.com/api",
                           "poll_seconds": 0.05})
        run = await client.create_flow_run_from_deployment(deployment_id)
        return str(run.id)


async def _work(pool: str, fake: FakeAzureML, flow_run_id: str):
    from prefect.client.orchestration import get_client

    from slmflow.azureml.worker import AzureMLWorker

    default = AzureMLWorker.__dict__["client_factory"]  # the class's own (a staticmethod)
    AzureMLWorker.client_factory = staticmethod(lambda cfg: fake)
    try:
        async with AzureMLWorker(work_pool_name=pool, name="aml-worker-test") as worker:
            await worker.get_and_submit_flow_runs()
    finally:
        AzureMLWorker.client_factory = default  # back to the class's default
    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


@contextlib.contextmanager
def _own_events_worker():
    """Prefect keeps one events worker per process, bound to the API it first talked to; drain
    it before this test's server stops, so later tests in the session get one bound to theirs
    (else their task-run events queue behind sends to a dead server and never arrive)."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30)
    try:
        yield
    finally:
        EventsWorker.drain_all(timeout=30)


def test_worker_submits_and_reports_failure_and_cancellation(server, monkeypatch):
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    for key in ("PREFECT_HOME", "PREFECT_API_URL"):
        monkeypatch.setenv(key, server[key])
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "aml-test", "--type", "azureml"],
                   env=server, capture_output=True, timeout=120, check=True)
    # Logs stay local: the API log handler would flush at exit, after the server has stopped.
    monkeypatch.setenv("PREFECT_LOGGING_TO_API_ENABLED", "false")
    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"],
                             PREFECT_LOGGING_TO_API_ENABLED: False}), _own_events_worker():
        # An AzureML job that fails: the run is Crashed, naming the job.
        run_id = asyncio.run(_flow_run("aml-test"))
        failing = FakeAzureML(["Queued", "Running", "Failed"])
        run = asyncio.run(_work("aml-test", failing, run_id))
        (job,) = failing.submitted
        assert run.infrastructure_pid == job.name
        assert job.environment_variables["PREFECT__FLOW_RUN_ID"] == run_id
        assert job.environment_variables["PREFECT_API_URL"] == "https://prefect.example.com/api"
        assert run.state.type.value == "CRASHED" and f"AzureML job {job.name} ended Failed" in run.state.message

        # Cancelled in Prefect while the AzureML job runs: the job is cancelled, the run Cancelled.
        run_id = asyncio.run(_flow_run("aml-test"))

        def cancel_in_prefect(reads: int) -> None:
            if reads == 2:
                from prefect.client.orchestration import get_client
                from prefect.states import Cancelling

                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(run_id, Cancelling(), force=True)

        running = FakeAzureML(["Queued", "Running"], on_read=cancel_in_prefect)
        run = asyncio.run(_work("aml-test", running, run_id))
        assert running.cancelled == [running.submitted[0].name]
        assert run.state.type.value == "CANCELLED", run.state


class LocalCluster:
    """A fake AzureML that runs a job's command as its processes on this machine, with the
    variables AzureML's PyTorch distribution sets: a process a node, each node its own folder."""

    def __init__(self, api_url: str, root: Path, nodes: int = 2, limit: float = 600) -> None:
        self.api_url, self.root, self.nodes = api_url, root, nodes
        self.procs: list[subprocess.Popen] = []
        self.submitted: list = []
        self.deadline = time.monotonic() + limit  # a hung job fails the test, with its logs

    def submit(self, job):
        import shlex

        self.submitted.append(job)
        port = str(_free_port())
        argv = shlex.split(job.command)
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        for node in range(self.nodes):
            folder = self.root / f"node-{node}"
            folder.mkdir(parents=True)
            env = {**os.environ, **job.environment_variables, "PREFECT_API_URL": self.api_url,
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(self.nodes),
                   "RANK": str(node), "NODE_RANK": str(node), "LOCAL_RANK": "0",
                   "PYTHONUNBUFFERED": "1", "PREFECT_LOGGING_TO_API_ENABLED": "false",
                   "SLMFLOW_DIST_WAIT_SECONDS": "300"}
            log = open(folder / "std_log.txt", "w")  # noqa: SIM115 - closed when the job ends
            self.procs.append(subprocess.Popen(argv, cwd=folder, env=env, stdout=log,
                                               stderr=subprocess.STDOUT))
        return SubmittedJob(name=job.name, studio_url=None)

    def status(self, name):
        if any(p.poll() is None for p in self.procs):
            if time.monotonic() < self.deadline:
                return "Running"
            self.cancel(name)
            return "Failed"
        return "Completed" if all(p.returncode == 0 for p in self.procs) else "Failed"

    def cancel(self, name):
        for p in self.procs:
            p.kill()

    def log(self, node: int) -> str:
        return (self.root / f"node-{node}" / "std_log.txt").read_text()


def test_a_two_node_job_runs_the_flow_once_and_trains_on_both_nodes(server, monkeypatch, tiny_model,
                                                                     tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from slmflow.configio import load_config

    for key in ("PREFECT_HOME", "PREFECT_API_URL"):
        monkeypatch.setenv(key, server[key])
    monkeypatch.setenv("PREFECT_LOGGING_TO_API_ENABLED", "false")
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "aml-dist", "--type", "azureml"],
                   env=server, capture_output=True, timeout=120, check=True)
    out = tmp_path / "run"
    config = load_config(REPO / "configs" / "tiny-phi3_lora_cpu.yaml", [
        f"model.name_or_path={tiny_model}", f"output_dir={out}", "finetune.max_steps=8",
        "finetune.batch_size=8", "finetune.checkpoint_every=4"])

    async def flow_run() -> str:
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("slmflow-pipeline")
            deployment_id = await client.create_deployment(
                flow_id, "aml-dist", work_pool_name="aml-dist",
                entrypoint="flows.pipeline.slmflow_pipeline",
                parameters={"config": config.model_dump(mode="json")},
                job_variables={"subscription_id": "sub-1", "resource_group": "rg-1",
                               "workspace": "ws-1", "compute": "cpu-cluster", "instance_count": 2,
                               "conda_file": str(REPO / "infra/azureml/conda.yaml"),
                               "prefect_api_url": "https://prefect.example.com/api",
                               "poll_seconds": 0.5})
            run = await client.create_flow_run_from_deployment(deployment_id)
            return str(run.id)

    cluster = LocalCluster(server["PREFECT_API_URL"], tmp_path / "cluster")
    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"],
                             PREFECT_LOGGING_TO_API_ENABLED: False}), _own_events_worker():
        run_id = asyncio.run(flow_run())
        try:
            run = asyncio.run(_work("aml-dist", cluster, run_id))
        finally:
            cluster.cancel("")
    first, second = cluster.log(0), cluster.log(1)
    assert run.state.type.value == "COMPLETED", (run.state, first[-3000:], second[-3000:])
    (job,) = cluster.submitted
    assert job.environment_variables["SLMFLOW_DIST_NODES"] == "2"
    assert first.count("Finished in state Completed") >= 1 and "Beginning flow run" not in second
    assert "[rank 0] training its share of each global batch (world size 2)" in first
    assert "[rank 1] training its share of each global batch (world size 2)" in second
    assert "[rank 1] done" in second and "releasing the waiting ranks" in first
    report = json.loads((out / "report.json").read_text())
    assert (report["training"]["world_size"], report["training"]["global_batch"]) == (2, 16)
    assert all(p.returncode == 0 for p in cluster.procs)
