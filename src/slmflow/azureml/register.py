"""Register an exported model folder (OUTPUT_DIR/model) in an AzureML workspace, through MLflow.

Run as:
    python -m slmflow.azureml.register runs/default/model --name tone-int4 \
        --subscription SUB --resource-group RG --workspace WS

The workspace's model list is its MLflow model registry, so this is the pipeline's own path
(`tracking.log_model`, slmflow.registry) aimed at the workspace's MLflow tracking URI: one run in
the experiment `slmflow-register` logs the folder, the version carries the same tags (every
file's sha256, the manifest's content hashes), and a folder already registered is not registered
again. A pipeline run inside an AzureML job with `tracking.log_model` needs none of this.
Needs the MLflow client and AzureML's plugin: pip install mlflow-skinny azureml-mlflow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slmflow.registry import check_model_folder

EXPERIMENT = "slmflow-register"


def register_exported_model(model_dir: Path, name: str, tracking_uri: str,
                            experiment: str = EXPERIMENT) -> str:
    """Register `model_dir` under `name` in the registry of `tracking_uri`; returns NAME:VERSION."""
    from mlflow import MlflowClient

    from slmflow.registry import register_model_folder

    check_model_folder(model_dir)  # before any call to the workspace
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id = client.create_run(experiment_id, run_name=f"register-{name}",
                               tags={"slmflow.model_dir": str(Path(model_dir).resolve())}).info.run_id
    try:
        version, reused = register_model_folder(client, run_id, Path(model_dir), name)
        client.set_tag(run_id, "slmflow.model_version", version)
        client.set_tag(run_id, "slmflow.model_version_reused", str(reused).lower())
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return f"{name}:{version}"


def main(argv: list[str] | None = None) -> int:
    from slmflow.azureml.client import AzureMLClient, Workspace

    p = argparse.ArgumentParser(prog="python -m slmflow.azureml.register", description=__doc__)
    p.add_argument("model_dir", type=Path, help="OUTPUT_DIR/model of a finished run")
    p.add_argument("--name", required=True, help="model name in the workspace")
    p.add_argument("--subscription", required=True, help="Azure subscription id")
    p.add_argument("--resource-group", required=True, help="resource group of the workspace")
    p.add_argument("--workspace", required=True, help="AzureML workspace name")
    args = p.parse_args(argv)
    check_model_folder(args.model_dir)
    client = AzureMLClient(Workspace(args.subscription, args.resource_group, args.workspace))
    print(register_exported_model(args.model_dir, args.name, client.mlflow_tracking_uri()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
