"""A flow run plus the pool's job variables → an AzureML command job (pure: no network).

The job runs `python -m slmflow.azureml.launch -- prefect flow-run execute` on the compute
cluster: the launcher fetches the secrets the job names (Key Vault references, never values) with
the compute's managed identity, then hands over to Prefect's engine, which reads the flow run
(`PREFECT__FLOW_RUN_ID`) from `PREFECT_API_URL`, runs the deployment's pull steps and the flow.

What reaches the job's environment:
- `PREFECT_API_URL`: the `prefect_api_url` job variable, else the worker's own; a loopback
  address is refused (the compute cannot reach the worker's 127.0.0.1).
- the flow run's attribution variables (`PREFECT__FLOW_RUN_ID`, `PREFECT__WORKER_NAME`, ...)
  and the worker's `PREFECT_LOGGING_*`/`PREFECT_CLIENT_*` settings; no other worker setting (its
  database URL, home folder and key stay on the worker).
- the `env` job variable, except that a name that looks like a secret (…_KEY, …_TOKEN, …SECRET,
  PASSWORD, AUTH, CONNECTION_STRING, SAS) must hold a `keyvault://VAULT/NAME` reference.
- `SLMFLOW_SECRET_<VAR>=keyvault://VAULT/NAME` for each secret: `prefect_api_key_secret`
  (PREFECT_API_KEY), `hf_token_secret` (HF_TOKEN) and `secret_env`.
- `SLMFLOW_AZUREML_SUBSCRIPTION_ID`, `..._RESOURCE_GROUP`, `..._WORKSPACE`: for azureml://
  datastore paths in the flow's config.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from slmflow.errors import ConfigError
from slmflow.uris import parse_keyvault

LAUNCHER = "python -m slmflow.azureml.launch --"
SECRET_PREFIX = "SLMFLOW_SECRET_"
# Worker settings that make sense in the job (everything else stays on the worker).
PASS_PREFIXES = ("PREFECT__", "PREFECT_LOGGING_", "PREFECT_CLIENT_")
_SECRET_WORDS = {"KEY", "KEYS", "TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "PWD",
                 "CREDENTIAL", "CREDENTIALS", "AUTH", "SAS"}
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def looks_secret(name: str) -> bool:
    """An environment variable name that usually holds a secret (HF_TOKEN, PREFECT_API_KEY...)."""
    upper = name.upper()
    return bool(_SECRET_WORDS & set(upper.split("_"))) or "CONNECTION_STRING" in upper


def check_api_url(url: str | None, field: str = "prefect_api_url") -> str:
    """The Prefect API URL the compute will call; refuses none and loopback addresses."""
    if not url:
        raise ConfigError(
            f"job variable {field}: the job needs a Prefect API URL that the AzureML compute can "
            "reach, and neither the job variables nor the worker's PREFECT_API_URL give one; set "
            f"{field} (e.g. https://prefect.example.com/api, or your Prefect Cloud workspace URL)"
        )
    parsed = urlparse(url)
    host = (parsed.hostname or "").lower()
    if parsed.scheme not in ("http", "https") or not host:
        raise ConfigError(f"job variable {field}: {url!r} is not an http(s) URL; "
                          "write e.g. https://prefect.example.com/api")
    loopback = host in ("localhost", "localhost.localdomain") or host.endswith(".localhost")
    try:
        ip = ipaddress.ip_address(host)
        loopback = loopback or ip.is_loopback or ip.is_unspecified or ip.is_link_local
    except ValueError:
        pass
    if loopback:
        raise ConfigError(
            f"job variable {field}: {url} is the worker's own loopback address, which the AzureML "
            f"compute cannot reach; set {field} to an address the compute can reach (the server "
            "started with --host 0.0.0.0 behind a reachable name, a private endpoint, or Prefect "
            "Cloud's https://api.prefect.cloud/api/accounts/.../workspaces/...)"
        )
    return url


def _secret_ref(ref: str, field: str) -> str:
    parse_keyvault(ref, field)
    return ref


def job_environment(
    worker_env: dict[str, str | None],
    user_env: dict[str, str | None],
    *,
    prefect_api_url: str | None,
    prefect_api_key_secret: str | None,
    hf_token_secret: str | None,
    secret_env: dict[str, str],
    workspace: tuple[str, str, str],
) -> dict[str, str]:
    """The job's environment variables: no secret value, only Key Vault references."""
    env: dict[str, str] = {
        k: v for k, v in worker_env.items()
        if v is not None and k.startswith(PASS_PREFIXES) and not looks_secret(k)
    }
    secrets: dict[str, str] = {}
    for name, value in user_env.items():
        if value is None:
            continue
        if value.startswith("keyvault://"):
            secrets[name] = _secret_ref(value, f"env.{name}")
        elif looks_secret(name):
            raise ConfigError(
                f"job variable env.{name}: a secret would be written into the job in clear text; "
                f"store it in Azure Key Vault and set env.{name} (or secret_env.{name}) to "
                "keyvault://VAULT/SECRET-NAME: the job fetches it with the compute's identity"
            )
        elif name != "PREFECT_API_URL":
            env[name] = value
    url = prefect_api_url or user_env.get("PREFECT_API_URL") or worker_env.get("PREFECT_API_URL")
    field = "prefect_api_url" if prefect_api_url or not user_env.get("PREFECT_API_URL") else \
        "env.PREFECT_API_URL"
    env["PREFECT_API_URL"] = check_api_url(url, field)
    for name, ref in secret_env.items():
        secrets[name] = _secret_ref(ref, f"secret_env.{name}")
    if hf_token_secret:
        secrets["HF_TOKEN"] = _secret_ref(hf_token_secret, "hf_token_secret")
    if prefect_api_key_secret:
        secrets["PREFECT_API_KEY"] = _secret_ref(prefect_api_key_secret, "prefect_api_key_secret")
    elif worker_env.get("PREFECT_API_KEY") or user_env.get("PREFECT_API_KEY"):
        raise ConfigError(
            "job variable prefect_api_key_secret: the worker talks to an API that needs "
            "PREFECT_API_KEY, and the job would need it too, but it is never written into a job; "
            "store the key in Azure Key Vault and set prefect_api_key_secret to "
            "keyvault://VAULT/SECRET-NAME"
        )
    if worker_env.get("PREFECT_API_AUTH_STRING") and "PREFECT_API_AUTH_STRING" not in secrets:
        raise ConfigError(
            "job variable secret_env: the worker's Prefect API has authentication "
            "(PREFECT_API_AUTH_STRING), which the job needs too but is never written into a job; "
            "store it in Azure Key Vault and set secret_env.PREFECT_API_AUTH_STRING to "
            "keyvault://VAULT/SECRET-NAME"
        )
    for name, ref in secrets.items():
        env[SECRET_PREFIX + name] = ref
    env["SLMFLOW_AZUREML_SUBSCRIPTION_ID"], env["SLMFLOW_AZUREML_RESOURCE_GROUP"], \
        env["SLMFLOW_AZUREML_WORKSPACE"] = workspace
    return env


def code_environment(env: dict[str, str], code_dir: str | None) -> dict[str, str]:
    """With a code snapshot of the slmflow checkout, its src/ and root are importable."""
    if code_dir and "PYTHONPATH" not in env:
        return {**env, "PYTHONPATH": "src:."}
    return env


def job_name(prefix: str, flow_run_id: Any, suffix: str | None = None) -> str:
    """A workspace-unique AzureML job name: PREFIX-<flow run id>-<6 hex> (a retry gets a new one)."""
    stem = _NAME.sub("-", prefix).strip("-_") or "slmflow"
    if not stem[0].isalpha():
        stem = "j" + stem
    return f"{stem}-{flow_run_id}-{suffix or uuid.uuid4().hex[:6]}"[:255]


def build_environment(cfg: Any) -> Any:
    """The job's environment: a registered one, a Docker build context, or conda file + image."""
    from azure.ai.ml.entities import BuildContext, Environment

    if cfg.environment:
        return cfg.environment
    if cfg.docker_context:
        path = Path(cfg.docker_context).expanduser()
        if not (path / "Dockerfile").is_file():
            raise ConfigError(
                f"job variable docker_context: {path.resolve()} has no Dockerfile; point it at a "
                "Docker build context, or leave it empty to use conda_file and base_image"
            )
        return Environment(build=BuildContext(path=str(path.resolve())))
    conda = Path(cfg.conda_file).expanduser()
    if not conda.is_file():
        raise ConfigError(
            f"job variable conda_file: {conda.resolve()} does not exist (a relative path is read "
            "from the worker's working directory); start the worker in the slmflow checkout, give "
            "an absolute path, or name a registered environment in job variable environment"
        )
    return Environment(conda_file=str(conda.resolve()), image=cfg.base_image)


def build_command_job(cfg: Any, flow_run_id: Any, *, suffix: str | None = None) -> Any:
    """The `azure.ai.ml` command job for one flow run (cfg: a prepared AzureMLJobConfiguration)."""
    from azure.ai.ml import PyTorchDistribution, command

    code = None
    if cfg.code_dir:
        code = Path(cfg.code_dir).expanduser().resolve()
        if not code.is_dir():
            raise ConfigError(f"job variable code_dir: {code} is not a folder; give the folder to "
                              "upload as the job's code, or leave it empty")
    distribution = None
    env = code_environment(dict(cfg.env), cfg.code_dir)
    if cfg.instance_count > 1 or cfg.processes_per_instance > 1:
        distribution = PyTorchDistribution(process_count_per_instance=cfg.processes_per_instance)
        # the job's shape, for the fine-tune's world (slmflow.distributed)
        env |= {"SLMFLOW_DIST_NODES": str(cfg.instance_count),
                "SLMFLOW_DIST_PROCS_PER_NODE": str(cfg.processes_per_instance)}
    node = command(
        name=job_name(cfg.job_name_prefix, flow_run_id, suffix),
        display_name=cfg.name,
        experiment_name=cfg.experiment_name,
        command=f"{LAUNCHER} {cfg.command}",
        code=str(code) if code else None,
        environment=build_environment(cfg),
        environment_variables=env,
        compute=cfg.compute,
        instance_count=cfg.instance_count,
        distribution=distribution,
        tags={k: str(v) for k, v in cfg.labels.items()},
    )
    return node._to_job()
