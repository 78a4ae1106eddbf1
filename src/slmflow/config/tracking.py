"""The tracking section (`tracking.*`): one MLflow run per flow run, the model registered."""

from __future__ import annotations

import string
from urllib.parse import urlparse

from pydantic import Field, field_validator

from slmflow.config.base import _Config

FROM_ENVIRONMENT = "env"
# Schemes an MLflow client resolves: a tracking server, AzureML's built-in one (azureml-mlflow),
# Databricks, or a local store.
TRACKING_SCHEMES = ("http", "https", "azureml", "databricks", "file", "sqlite")
# What a run name template may use (slmflow.tracking fills them in).
RUN_NAME_FIELDS = ("output_name", "flow_run_name", "flow_run_id", "model", "recipe", "date")
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class TrackingConfig(_Config):
    """Experiment tracking in MLflow (off by default: the embedded default run needs no server).

    Credentials never go in the config: MLflow reads MLFLOW_TRACKING_TOKEN (or
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) from the environment, and an AzureML
    job brings its own.
    """

    enabled: bool = Field(
        False,
        title="Track in MLflow",
        description="Log every run as one MLflow run: the config as params, the loss per step, "
        "each model's metrics, stage seconds and cached flags, the report and the manifest. The "
        "server is checked before any stage runs.",
    )
    uri: str = Field(
        FROM_ENVIRONMENT,
        title="Tracking URI",
        description="The MLflow tracking server, e.g. http://127.0.0.1:5000; 'env': "
        "$MLFLOW_TRACKING_URI (what an AzureML job sets; azureml:// needs azureml-mlflow).",
        min_length=1,
        max_length=2000,
    )
    experiment: str = Field(
        "slmflow",
        title="Experiment",
        description="MLflow experiment name (created when missing). In an AzureML job (an "
        "azureml:// URI with MLFLOW_RUN_ID set) the job's own run, in the job's experiment, is "
        "used instead.",
        min_length=1,
        max_length=500,
    )
    run_name: str = Field(
        "{output_name}-{flow_run_name}",
        title="Run name",
        description="MLflow run name; may use {output_name} (output_dir's last part), "
        "{flow_run_name} and {flow_run_id} (Prefect's; 'local' without Prefect), {model} "
        "(model.name_or_path's last part), {recipe} (export.recipe) and {date} (UTC, "
        "YYYYMMDD-HHMMSS).",
        min_length=1,
        max_length=250,
    )
    log_model: bool = Field(
        False,
        title="Log and register the model",
        description="Log the published ONNX folder (OUTPUT_DIR/model) and register it as a "
        "version of model_name, tagged with its files' content hashes. An unchanged model is not "
        "registered twice: the run names the version that holds it. A run that fails the quality "
        "gate registers nothing.",
    )
    model_name: str = Field(
        "slmflow-model",
        title="Registered model name",
        description="The registered model (MLflow model registry; on AzureML, the workspace's "
        "model list) that log_model adds versions to.",
        pattern=MODEL_NAME,
        max_length=250,
    )

    @field_validator("uri")
    @classmethod
    def _uri_shape(cls, uri: str) -> str:
        if uri == FROM_ENVIRONMENT:
            return uri
        return check_tracking_uri(uri, "tracking.uri")

    @field_validator("run_name")
    @classmethod
    def _known_fields(cls, template: str) -> str:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:
            raise ValueError(f"tracking.run_name: {template!r} is no valid template ({exc}); "
                             "write {{ and }} for literal braces") from None
        unknown = sorted(fields - set(RUN_NAME_FIELDS))
        if unknown:
            raise ValueError(f"tracking.run_name: unknown field(s) {unknown}; use "
                             f"{', '.join('{' + f + '}' for f in RUN_NAME_FIELDS)}")
        return template


def check_tracking_uri(uri: str, field: str) -> str:
    """A tracking URI's shape: a known scheme, and no credentials in it (they would reach logs)."""
    parsed = urlparse(uri)
    if parsed.scheme not in TRACKING_SCHEMES:
        raise ValueError(f"{field}: {uri!r} is no MLflow tracking URI; write e.g. "
                         f"http://127.0.0.1:5000 ({', '.join(TRACKING_SCHEMES)}), or 'env' for "
                         "$MLFLOW_TRACKING_URI")
    if parsed.scheme in ("http", "https") and not parsed.hostname:
        raise ValueError(f"{field}: {uri!r} names no host; write e.g. http://127.0.0.1:5000")
    if parsed.password is not None or (parsed.username and parsed.scheme in ("http", "https")):
        raise ValueError(f"{field}: the URI holds credentials, which would be written into logs "
                         "and the run's params; drop them and set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
    return uri
