"""Deploy the slmflow pipeline to a Prefect server: one deployment per work pool.

Each deployment's default parameters are a config file of `configs/`, loaded and validated by
slmflow's own loader (a bad config stops here, naming the key). The entrypoint is the installed
module `flows.pipeline:slmflow_pipeline`, so no path of this machine is stored: a worker runs the
flow in its working directory (relative paths in a config, such as `output_dir`, resolve there).

Run as:
    PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/deploy.py
    python deployments/deploy.py --only local-cpu --schedules-active
    python deployments/deploy.py --list        # what would be deployed, without a server

Deployments whose work pool does not exist are skipped with a note (`infra/local/up` creates
the local pools; `prefect work-pool create azureml --type azureml` the AzureML one); naming
such a deployment with `--only` is an error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FLOW_NAME = "slmflow-pipeline"
NIGHTLY = "0 2 * * *"  # 02:00 every night, in SCHEDULE_TIMEZONE
SCHEDULE_TIMEZONE = "UTC"


@dataclass(frozen=True)
class DeploymentSpec:
    """A deployment of the pipeline flow: where it runs and which config it starts from."""

    name: str
    work_pool: str
    config: str  # relative to the repository root
    description: str
    cron: str | None = None
    tags: tuple[str, ...] = ()
    job_variables: dict[str, Any] = field(default_factory=dict)


DEPLOYMENTS = (
    DeploymentSpec(
        name="local-cpu",
        work_pool="local-cpu",
        config="configs/smollm2-135m_lora_cpu.yaml",
        description="SmolLM2-135M-Instruct + LoRA on CPU, int4 ONNX for CPU (the embedded default).",
        cron=NIGHTLY,
        tags=("cpu", "lora"),
    ),
    DeploymentSpec(
        name="local-gpu",
        work_pool="local-gpu",
        config="configs/phi3-mini_qlora_cuda.yaml",
        description="Phi-3-mini-4k-instruct + QLoRA (bitsandbytes nf4) on a CUDA GPU, int4 ONNX for CUDA.",
        tags=("gpu", "qlora"),
    ),
    DeploymentSpec(
        name="azureml",
        work_pool="azureml",
        config="configs/phi3-mini_qlora_cuda.yaml",
        description="The GPU recipe as an AzureML command job on a compute cluster (pool type azureml).",
        tags=("gpu", "qlora", "azureml"),
        # the checkout (the worker's working directory) is uploaded as the job's code, so the
        # module entrypoint imports from it (infra/azureml/README.md)
        job_variables={"code_dir": "."},
    ),
)


def default_parameters(spec: DeploymentSpec) -> dict[str, Any]:
    """The flow parameters of a deployment: its config file, validated, every default written out."""
    from slmflow.configio import load_config

    config = load_config(REPO / spec.config)  # an absolute spec.config stays as it is
    return {"config": config.model_dump(mode="json"), "overrides": []}


def build_deployment(spec: DeploymentSpec, schedules_active: bool = False) -> Any:
    """The Prefect RunnerDeployment of `spec` (nothing is sent to a server)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import slmflow_pipeline

    schedules = (
        [Cron(spec.cron, timezone=SCHEDULE_TIMEZONE, active=schedules_active)] if spec.cron else []
    )
    deployment = slmflow_pipeline.to_deployment(
        name=spec.name,
        description=spec.description,
        tags=list(spec.tags),
        parameters=default_parameters(spec),
        schedules=schedules,
        work_pool_name=spec.work_pool,
        job_variables=dict(spec.job_variables),
        entrypoint_type=EntrypointType.MODULE_PATH,
        enforce_parameter_schema=True,
    )
    # `slmflow run` hands the flow the inputs it resolved already; a deployment's runs resolve
    # their own, so the form shows only `config` and `overrides`.
    schema = deployment._parameter_openapi_schema
    schema.properties.pop("resolved_inputs", None)
    for name in ("RunInputs", "Store", "ArtifactRef"):
        schema.definitions.pop(name, None)
    return deployment


def existing_pools() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {pool.name for pool in client.read_work_pools()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"deploy only these (of {', '.join(d.name for d in DEPLOYMENTS)})")
    parser.add_argument("--schedules-active", action="store_true",
                        help="turn the nightly schedule on (it is deployed paused by default)")
    parser.add_argument("--config", action="append", metavar="NAME=FILE", default=[],
                        help="start deployment NAME from FILE instead of its configs/ file")
    parser.add_argument("--list", action="store_true", help="print the plan; contact no server")
    args = parser.parse_args(argv)

    from slmflow.errors import SlmflowError

    names = {d.name for d in DEPLOYMENTS}
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        print(f"error: --only {', '.join(unknown)}: no such deployment; choose from "
              f"{', '.join(sorted(names))}", file=sys.stderr)
        return 2
    chosen = [d for d in DEPLOYMENTS if not args.only or d.name in args.only]
    for item in args.config:
        name, sep, path = item.partition("=")
        if not sep or name not in names or not path:
            print(f"error: --config {item!r}: expected NAME=FILE with NAME one of "
                  f"{', '.join(sorted(names))}", file=sys.stderr)
            return 2
        chosen = [replace(d, config=path) if d.name == name else d for d in chosen]
    try:  # every config validated before anything is sent
        built = [(spec, build_deployment(spec, args.schedules_active)) for spec in chosen]
    except SlmflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for spec, _ in built:
            print(f"{FLOW_NAME}/{spec.name}\tpool={spec.work_pool}\tconfig={spec.config}\t"
                  f"schedule={spec.cron or '-'}")
        return 0

    pools = existing_pools()
    missing = [spec for spec, _ in built if spec.work_pool not in pools]
    if args.only and missing:
        print("error: " + "; ".join(
            f"work pool '{s.work_pool}' of deployment {s.name} does not exist: create it with "
            f"`prefect work-pool create {s.work_pool} --type {pool_type(s)}`" for s in missing),
            file=sys.stderr)
        return 2
    for spec, deployment in built:
        if spec in missing:
            print(f"skipped {FLOW_NAME}/{spec.name}: no work pool '{spec.work_pool}' "
                  f"(`prefect work-pool create {spec.work_pool} --type {pool_type(spec)}`)")
            continue
        deployment_id = deployment.apply()
        state = "active" if args.schedules_active else "paused"
        schedule = f", schedule '{spec.cron}' {SCHEDULE_TIMEZONE} ({state})" if spec.cron else ""
        print(f"deployed {FLOW_NAME}/{spec.name} ({deployment_id}) to pool '{spec.work_pool}' "
              f"from {spec.config}{schedule}")
    return 0


def pool_type(spec: DeploymentSpec) -> str:
    return "azureml" if spec.work_pool == "azureml" else "process"


if __name__ == "__main__":
    sys.exit(main())
