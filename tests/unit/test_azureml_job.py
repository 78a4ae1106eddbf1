"""The azureml worker's job: YAML that load_job reads back, no secret in clear text, refusals,
the entry point, the in-job launcher, and the credential (no managed-identity probe off Azure)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from slmflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
API_KEY = "pnu_THIS-IS-THE-WORKER-KEY-0123456789"
HF_TOKEN = "hf_THIS-IS-A-TOKEN-0123456789"


@pytest.fixture(autouse=True)
def no_azure_probe(monkeypatch):
    """DefaultAzureCredential is never built with the managed identity probe in these tests."""
    import azure.identity

    built = []

    class Recorder:
        def __init__(self, **kwargs):
            built.append(kwargs)

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", Recorder)
    monkeypatch.delenv("AZUREML_RUN_ID", raising=False)
    monkeypatch.delenv("SLMFLOW_AZURE_MANAGED_IDENTITY", raising=False)
    return built


def flow_run(name: str = "brave-fox"):
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(id=uuid.uuid4(), name=name, flow_id=uuid.uuid4())


def configuration(monkeypatch, worker_env: dict[str, str] | None = None, **values):
    """A prepared job configuration for a sample flow run, as the worker builds it."""
    from prefect.settings import Settings

    from slmflow.azureml.worker import AzureMLJobConfiguration, AzureMLWorker

    settings = Settings(**(worker_env if worker_env is not None else {
        "api": {"url": "https://prefect.example.com/api", "key": API_KEY}}))
    monkeypatch.setattr(AzureMLJobConfiguration, "_base_environment",
                        classmethod(lambda cls: settings.to_environment_variables(exclude_unset=True)))
    template = AzureMLWorker.get_default_base_job_template()
    values = {"subscription_id": "sub-1", "resource_group": "rg-1", "workspace": "ws-1",
              "compute": "gpu-cluster", "conda_file": str(REPO / "infra/azureml/conda.yaml"),
              "prefect_api_key_secret": "keyvault://kv-slm/prefect-api-key", **values}
    cfg = asyncio.run(AzureMLJobConfiguration.from_template_and_values(template, values, client=object()))
    run = flow_run()
    cfg.prepare_for_flow_run(run, worker_name="worker-1")
    return cfg, run


def test_worker_type_comes_from_the_prefect_collections_entry_point():
    from importlib.metadata import entry_points

    from prefect.workers.base import BaseWorker

    from slmflow.azureml.worker import AzureMLWorker

    assert any(ep.value == "slmflow.azureml.worker" for ep in entry_points(group="prefect.collections"))
    assert BaseWorker.get_worker_class_from_type("azureml") is AzureMLWorker
    variables = AzureMLWorker.get_default_base_job_template()["variables"]["properties"]
    for name in ("subscription_id", "resource_group", "workspace", "compute", "instance_count",
                 "processes_per_instance", "environment", "conda_file", "base_image",
                 "docker_context", "env", "job_name_prefix", "experiment_name", "prefect_api_url"):
        assert variables[name].get("title") and variables[name].get("description"), name
    for name, spec in variables.items():
        assert spec.get("title") and spec.get("description"), f"job variable {name}"


def test_job_yaml_loads_back_and_names_compute_environment_command_and_variables(
        monkeypatch, tmp_path):
    from azure.ai.ml import load_job

    cfg, run = configuration(
        monkeypatch, instance_count=2, processes_per_instance=4, experiment_name="tone-runs",
        job_name_prefix="slm", env={"HF_TOKEN": "keyvault://kv-slm/hf-token", "FOO": "bar"},
        secret_env={"WANDB_API_KEY": "keyvault://kv-slm/wandb"})
    job = cfg.build_job(suffix="a1b2c3")
    path = tmp_path / "job.yml"
    job.dump(str(path))
    text = path.read_text()
    loaded = load_job(str(path))

    assert loaded.compute == "gpu-cluster"
    assert loaded.name == f"slm-{run.id}-a1b2c3" and loaded.experiment_name == "tone-runs"
    assert loaded.display_name == "brave-fox"
    assert loaded.command == "python -m slmflow.azureml.launch -- prefect flow-run execute"
    assert loaded.environment.image.startswith("mcr.microsoft.com/azureml/")
    assert "prefect==3.9.1" in str(loaded.environment.conda_file)
    assert loaded.resources.instance_count == 2
    assert loaded.distribution.type == "pytorch"
    assert loaded.distribution.process_count_per_instance == 4
    env = loaded.environment_variables
    assert env["PREFECT__FLOW_RUN_ID"] == str(run.id)
    assert env["PREFECT_API_URL"] == "https://prefect.example.com/api"
    assert env["FOO"] == "bar"
    assert env["SLMFLOW_SECRET_PREFECT_API_KEY"] == "keyvault://kv-slm/prefect-api-key"
    assert env["SLMFLOW_SECRET_HF_TOKEN"] == "keyvault://kv-slm/hf-token"
    assert env["SLMFLOW_SECRET_WANDB_API_KEY"] == "keyvault://kv-slm/wandb"
    assert env["SLMFLOW_AZUREML_WORKSPACE"] == "ws-1"
    assert "PREFECT_API_KEY" not in env and "HF_TOKEN" not in env
    assert API_KEY not in text  # the worker's key never reaches the job
    assert loaded.tags["prefect.io/flow-run-id"] == str(run.id)


def test_job_with_a_registered_environment_or_a_docker_context(monkeypatch, tmp_path):
    from azure.ai.ml import load_job

    cfg, _ = configuration(monkeypatch, environment="azureml:slmflow-gpu:3")
    cfg.build_job().dump(str(tmp_path / "a.yml"))
    assert "environment: azureml:slmflow-gpu:3" in (tmp_path / "a.yml").read_text()
    assert load_job(str(tmp_path / "a.yml")).environment == "slmflow-gpu:3"

    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM python:3.11\n")
    cfg, _ = configuration(monkeypatch, docker_context=str(tmp_path / "ctx"))
    cfg.build_job().dump(str(tmp_path / "b.yml"))
    assert load_job(str(tmp_path / "b.yml")).environment.build.path == str(tmp_path / "ctx")
    single = cfg.build_job()
    assert single.distribution is None and single.resources.instance_count == 1
    cfg, _ = configuration(monkeypatch, code_dir=str(REPO))
    with_code = cfg.build_job()
    assert with_code.code == str(REPO) and with_code.environment_variables["PYTHONPATH"] == "src:."


def test_worker_settings_other_than_logging_stay_on_the_worker(monkeypatch):
    cfg, _ = configuration(monkeypatch, worker_env={
        "api": {"url": "https://prefect.example.com/api"},
        "home": "worker-home/.prefect",  # the worker machine's own
        "server": {"database": {"connection_url": "postgresql+asyncpg://u:pw@db/prefect"}},
        "logging": {"level": "DEBUG"}}, prefect_api_key_secret=None)
    env = cfg.job_env()
    assert env["PREFECT_LOGGING_LEVEL"] == "DEBUG"
    assert not any("DATABASE" in k or k == "PREFECT_HOME" for k in env)
    assert "pw@db" not in str(env)


@pytest.mark.parametrize("url", ["http://127.0.0.1:4200/api", "http://localhost:4200/api",
                                 "http://[::1]:4200/api", "http://0.0.0.0:4200/api"])
def test_a_loopback_api_url_is_refused_naming_the_variable_and_the_fix(monkeypatch, url):
    cfg, _ = configuration(monkeypatch, prefect_api_url=url)
    with pytest.raises(ConfigError, match=r"job variable prefect_api_url: .* loopback address, "
                                          r"which the AzureML compute cannot reach; set prefect_api_url"):
        cfg.build_job()


def test_the_workers_own_loopback_url_is_refused_too(monkeypatch):
    cfg, _ = configuration(monkeypatch, worker_env={"api": {"url": "http://127.0.0.1:4200/api"}},
                           prefect_api_key_secret=None)
    with pytest.raises(ConfigError, match=r"prefect_api_url: http://127.0.0.1:4200/api is the "
                                          r"worker's own loopback address"):
        cfg.job_env()
    cfg, _ = configuration(monkeypatch, worker_env={"api": {"url": "http://127.0.0.1:4200/api"}},
                           prefect_api_key_secret=None, prefect_api_url="https://10.1.2.3/api")
    assert cfg.job_env()["PREFECT_API_URL"] == "https://10.1.2.3/api"


def test_a_secret_in_clear_text_is_refused(monkeypatch):
    cfg, _ = configuration(monkeypatch, env={"HF_TOKEN": HF_TOKEN})
    with pytest.raises(ConfigError, match=r"job variable env.HF_TOKEN: a secret would be written "
                                          r"into the job in clear text; store it in Azure Key Vault"):
        cfg.build_job()
    cfg, _ = configuration(monkeypatch, env={"TOKENIZERS_PARALLELISM": "false"})
    assert cfg.job_env()["TOKENIZERS_PARALLELISM"] == "false"  # a name, not a secret


def test_an_api_key_without_a_key_vault_reference_is_refused(monkeypatch):
    cfg, _ = configuration(monkeypatch, prefect_api_key_secret=None)
    with pytest.raises(ConfigError, match=r"job variable prefect_api_key_secret: .* never written "
                                          r"into a job; store the key in Azure Key Vault"):
        cfg.build_job()


def test_an_api_auth_string_reaches_the_job_only_from_key_vault(monkeypatch):
    auth = {"api": {"url": "https://prefect.example.com/api", "auth_string": "ops:pw-0123456789"}}
    cfg, _ = configuration(monkeypatch, worker_env=auth, prefect_api_key_secret=None)
    with pytest.raises(ConfigError, match=r"job variable secret_env: the worker's Prefect API has "
                                          r"authentication .*secret_env.PREFECT_API_AUTH_STRING"):
        cfg.build_job()
    ref = "keyvault://kv-slm/prefect-auth"
    cfg, _ = configuration(monkeypatch, worker_env=auth, prefect_api_key_secret=None,
                           secret_env={"PREFECT_API_AUTH_STRING": ref})
    env = cfg.job_env()
    assert env["SLMFLOW_SECRET_PREFECT_API_AUTH_STRING"] == ref
    assert "ops:pw-0123456789" not in json.dumps(env)


def test_bad_references_and_paths_name_the_variable(monkeypatch, tmp_path):
    cfg, _ = configuration(monkeypatch, secret_env={"X_TOKEN": "my-vault/x"})
    with pytest.raises(ConfigError, match=r"secret_env.X_TOKEN: 'my-vault/x' is not a Key Vault "
                                          r"secret reference; write keyvault://<vault-name>/<secret-name>"):
        cfg.build_job()
    cfg, _ = configuration(monkeypatch, conda_file=str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"job variable conda_file: .*missing.yaml does not exist"):
        cfg.build_job()
    cfg, _ = configuration(monkeypatch, docker_context=str(tmp_path))
    with pytest.raises(ConfigError, match=r"job variable docker_context: .* has no Dockerfile"):
        cfg.build_job()


def test_the_job_carries_what_mlflow_tracking_needs_and_no_tracking_uri(monkeypatch, tmp_path):
    """The environment has the MLflow client (the `tracking` extra's pin) and AzureML's plugin;
    the tracking URI is AzureML's to set in the job, never the worker's (nor hard-coded)."""
    import tomllib

    from azure.ai.ml import load_job

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # the worker's own
    cfg, _ = configuration(monkeypatch)
    path = tmp_path / "job.yml"
    cfg.build_job(suffix="a1b2c3").dump(str(path))
    loaded = load_job(str(path))
    conda = str(loaded.environment.conda_file)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [client] = extras["tracking"]
    assert client.startswith("mlflow-skinny==") and client in conda
    assert "azureml-mlflow==" in conda
    assert not any(k.startswith("MLFLOW_") for k in loaded.environment_variables)
    assert "127.0.0.1:5000" not in path.read_text()


def test_the_shipped_conda_file_pins_what_pyproject_pins():
    import tomllib

    import yaml

    conda = yaml.safe_load((REPO / "infra/azureml/conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = [d.split("#")[0].strip() for d in deps if "==" in d]
    for pin in pinned:
        assert pin in pip, f"infra/azureml/conda.yaml lacks {pin}"


# ---- the launcher (what the job runs) ---------------------------------------------------------
def test_launcher_fetches_key_vault_secrets_then_execs_prefect():
    from slmflow.azureml import launch

    environ = {"SLMFLOW_SECRET_HF_TOKEN": "keyvault://kv-slm/hf-token",
               "SLMFLOW_SECRET_PREFECT_API_KEY": "keyvault://kv-slm/prefect-api-key",
               "PREFECT__FLOW_RUN_ID": "abc", "RANK": "0", "MASTER_ADDR": "10.0.0.4"}
    fetched, execs = [], []

    def fetch(ref):
        fetched.append((ref.vault_url, ref.name))
        return {"hf-token": HF_TOKEN, "prefect-api-key": API_KEY}[ref.name]

    launch.main(["--", "prefect", "flow-run", "execute"], environ, fetch,
                execvpe=lambda *a: execs.append(a))
    assert sorted(fetched) == [("https://kv-slm.vault.azure.net", "hf-token"),
                               ("https://kv-slm.vault.azure.net", "prefect-api-key")]
    (_file, argv, env), = execs
    assert argv[1:] == ["-m", "prefect", "flow-run", "execute"]
    assert env["HF_TOKEN"] == HF_TOKEN and env["PREFECT_API_KEY"] == API_KEY
    assert "RANK" not in env and env["SLMFLOW_DIST_MASTER_ADDR"] == "10.0.0.4"


def test_launcher_runs_the_flow_on_rank_0_and_the_other_ranks_wait_for_the_fine_tune():
    from slmflow.azureml import launch

    job = {"WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.4", "MASTER_PORT": "6105",
           "SLMFLOW_DIST_NODES": "2", "SLMFLOW_DIST_PROCS_PER_NODE": "2"}
    execs, flows = [], []
    follower = {**job, "RANK": "3", "LOCAL_RANK": "1", "NODE_RANK": "1"}
    assert launch.main(["--", "prefect", "flow-run", "execute"], follower, lambda ref: "",
                       execvpe=lambda *a: execs.append(a),
                       run_rank0=lambda *a: pytest.fail("the flow runs on rank 0 only")) == 0
    (_file, argv, env), = execs
    assert argv[1:] == ["-m", "slmflow.stages.finetune_rank"]  # waits at the job's rendezvous
    assert env["RANK"] == "3" and env["MASTER_ADDR"] == "10.0.0.4"  # kept for torch.distributed

    first = {**job, "RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0"}
    assert launch.main(["--", "prefect", "flow-run", "execute"], first, lambda ref: "",
                       execvpe=lambda *a: pytest.fail("rank 0 of a job keeps its process"),
                       run_rank0=lambda argv, env: flows.append((argv, dict(env))) or 7) == 7
    (argv, env), = flows
    assert argv[1:] == ["-m", "prefect", "flow-run", "execute"]
    assert "RANK" not in env and "WORLD_SIZE" not in env  # the flow does not see the job's ranks
    assert env["SLMFLOW_DIST_WORLD_SIZE"] == "4" and env["SLMFLOW_DIST_NODES"] == "2"


def test_secrets_module_reads_a_key_vault_reference(monkeypatch):
    from slmflow import secrets

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("SLMFLOW_SECRET_HF_TOKEN", "keyvault://kv-slm/hf-token")
    monkeypatch.setattr("slmflow.azureml.launch.keyvault_fetch", lambda ref: f"value-of-{ref.name}")
    assert secrets.get_secret("HF_TOKEN", block="hf-token") == "value-of-hf-token"


# ---- credentials and the SDK wrapper ----------------------------------------------------------
def test_credential_skips_the_managed_identity_probe_off_azure(no_azure_probe, monkeypatch):
    from slmflow.azureml.client import make_credential

    make_credential()
    assert no_azure_probe[-1] == {"exclude_managed_identity_credential": True}
    monkeypatch.setenv("AZUREML_RUN_ID", "job-1")
    monkeypatch.setenv("DEFAULT_IDENTITY_CLIENT_ID", "cid")
    make_credential()
    assert no_azure_probe[-1] == {"exclude_managed_identity_credential": False,
                                  "managed_identity_client_id": "cid"}


def test_sdk_wrapper_calls_mlclient_jobs():
    from types import SimpleNamespace

    from slmflow.azureml.client import AzureMLClient, Workspace

    calls = []

    class Jobs:
        def create_or_update(self, job):
            calls.append(("create", job))
            return SimpleNamespace(name="slm-1", studio_url="https://ml.azure.com/runs/slm-1",
                                   status="Starting")

        def get(self, name):
            return SimpleNamespace(status="Running")

        def begin_cancel(self, name):
            calls.append(("cancel", name))
            return SimpleNamespace(result=lambda timeout: None)

    client = AzureMLClient(Workspace("s", "r", "w"), credential=object())
    client._ml = SimpleNamespace(jobs=Jobs())
    submitted = client.submit("JOB")
    assert submitted.name == "slm-1" and submitted.status == "Starting"
    assert client.status("slm-1") == "Running"
    client.cancel("slm-1")
    assert calls == [("create", "JOB"), ("cancel", "slm-1")]


def test_mlclient_constructs_offline_without_probing(no_azure_probe):
    from slmflow.azureml.client import AzureMLClient, Workspace

    ml = AzureMLClient(Workspace("00000000-0000-0000-0000-000000000000", "rg", "ws")).ml
    assert ml.workspace_name == "ws"
    assert no_azure_probe == [{"exclude_managed_identity_credential": True}]

def test_a_waiting_rank_rejoins_only_after_the_last_rounds_rendezvous_has_closed():
    """Joining while the last round's rank 0 still exits hangs on its dying store (seen in CI:
    the release never met the waiting rank): the waiting rank first waits for the port to close."""
    import socket
    import threading
    import time

    from slmflow.stages.finetune_rank import wait_until_closed

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert wait_until_closed("127.0.0.1", port, limit=0.5) is False  # still there: not closed

    closer = threading.Timer(0.6, server.close)
    closer.start()
    started = time.monotonic()
    assert wait_until_closed("127.0.0.1", port, limit=30) is True
    assert time.monotonic() - started >= 0.5  # it waited for the close, not the limit
    closer.join()
