"""Before any stage: the tracking URI resolves, the MLflow client is installed, the server
answers as MLflow and accepts our credentials (`tracking.*`; slmflow.preflight calls it).

One request, with urllib: the MLflow client itself retries an unreachable server for minutes.
Also: which environment values are secrets, kept out of everything sent to MLflow (`redact`).
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import urllib.error
import urllib.parse
import urllib.request

from slmflow.config import TrackingConfig
from slmflow.config.tracking import FROM_ENVIRONMENT, check_tracking_uri
from slmflow.errors import ConfigError

_SECRET_NAME = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|PWD|CREDENTIALS?|AUTH|SAS)(_|$)"
                          r"|CONNECTION_STRING", re.IGNORECASE)


def tracking_uri(cfg: TrackingConfig) -> str:
    """The tracking URI: the config's, or $MLFLOW_TRACKING_URI for 'env'."""
    if cfg.uri != FROM_ENVIRONMENT:
        return cfg.uri
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("tracking.uri: 'env' takes the URI from MLFLOW_TRACKING_URI, which is not "
                          "set (an AzureML job sets it); set it, or tracking.uri=http://HOST:PORT, "
                          "or tracking.enabled=false")
    try:
        return check_tracking_uri(uri, "MLFLOW_TRACKING_URI")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _auth_header() -> dict[str, str]:
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _probe_http(uri: str, experiment: str, timeout: float) -> None:
    """One request to the server's REST API: it answers as MLflow, and accepts our credentials."""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    request = urllib.request.Request(url, headers=_auth_header())
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        body = exc.read(2000).decode(errors="replace")
        if exc.code == 404 and "RESOURCE_DOES_NOT_EXIST" in body:
            return  # MLflow answering: no such experiment yet (created at the start)
        if exc.code in (401, 403):
            raise ConfigError(f"tracking.uri: the MLflow server at {uri} refuses us (HTTP "
                              f"{exc.code}); set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME "
                              "and MLFLOW_TRACKING_PASSWORD") from None
        raise ConfigError(f"tracking.uri: {uri} answers HTTP {exc.code} to MLflow's REST API; is it "
                          "an MLflow tracking server? fix tracking.uri") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"tracking.uri: no MLflow server answers at {uri} ({reason}); start one "
                          "(mlflow server --host 127.0.0.1 --port 5000), fix tracking.uri, or set "
                          "tracking.enabled=false") from None


def check_tracking(cfg: TrackingConfig, timeout: float = 10.0) -> None:
    """Before any stage: the client is installed and the server answers (one line if not)."""
    if not cfg.enabled:
        return
    uri = tracking_uri(cfg)
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("tracking.enabled: the MLflow client is not installed; pip install "
                          "'slmflow[tracking]' (mlflow-skinny), or set tracking.enabled=false")
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        return _probe_http(uri, cfg.experiment, timeout)
    if scheme == "azureml" and importlib.util.find_spec("azureml.mlflow") is None:
        raise ConfigError("tracking.uri: an azureml:// tracking URI needs the azureml-mlflow "
                          "plugin; pip install azureml-mlflow (infra/azureml/conda.yaml has it)")
    try:
        from mlflow import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any store error means: not usable
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"tracking.uri: MLflow cannot use {uri} ({first}); fix tracking.uri or "
                          "set tracking.enabled=false") from None


def secret_values() -> list[str]:
    """Values of environment variables whose names say they hold a secret (HF_TOKEN, ...)."""
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6]


def redact(value: str, secrets: list[str]) -> str:
    for secret in secrets:
        value = value.replace(secret, "***")
    return value
