"""Deploy the slmflow pipeline to a Prefect server: one deployment per work pool.

Each deployment's default parameters are a config file of `configs/`, loaded and validated by
slmflow's own loader (a bad config stops here, naming the key). The entrypoint is the installed
module `flows.pipeline:slmflow_pipeline`, so no path of this machine is stored: a worker runs the
flow in its working directory (relative paths in a config, such as `output_dir`, resolve there).

Run as:
    PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/deploy.py
    python deployments/deploy.py --only local-cpu --schedules-active
    python deployments/deploy.py --list        # what would be deployed, without a server
    python deployments/deploy.py --stages-on gpu-a --stages-on cpu-b   # the stage flow only

Deployments whose work pool does not exist are skipped with a note (`infra/local/up` creates
the local pools; `prefect work-pool create azureml --type azureml` the AzureML one); naming
such a deployment with `--only` is an error.

Stages placed on work pools (`placement` in a config) run as flow runs of `slmflow-stage/POOL`,
the per-stage flow deployed on each pool: on the pools of the deployments above and the pools
their configs place stages on, or with `--stages-on POOL` on that pool only.
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
    DeploymentSpec(
        name="azureml-split",
        work_pool="local-cpu",
        config="configs/phi3-mini_qlora_azureml-split.yaml",
        description="The GPU recipe split by placement: the fine-tune as an AzureML job (pool "
        "azureml), every other stage on CPU (pool local-cpu), through the shared store.",
        tags=("gpu", "qlora", "azureml", "split"),
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


def stage_pools(specs: list[DeploymentSpec]) -> list[str]:
    """The pools the stage flow goes on: those of `specs`, and those their configs place stages on."""
    from slmflow.configio import load_config

    pools = {spec.work_pool for spec in specs}
    for spec in specs:
        pools |= set(load_config(REPO / spec.config).placement.pools().values())
    return sorted(pools)


def build_stage_deployment(pool: str) -> Any:
    """The deployment slmflow-stage/POOL: the per-stage flow of placed stages, on `pool`."""
    from prefect.deployments.runner import EntrypointType

    from flows.placed import slmflow_stage

    job_variables = next((dict(d.job_variables) for d in DEPLOYMENTS if d.work_pool == pool), {})
    return slmflow_stage.to_deployment(
        name=pool,
        description=f"Stages of slmflow runs placed on work pool '{pool}' (config: placement).",
        tags=["slmflow-stage"],
        work_pool_name=pool,
        job_variables=job_variables,
        entrypoint_type=EntrypointType.MODULE_PATH,
        enforce_parameter_schema=True,
    )


def existing_pools() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {pool.name for pool in client.read_work_pools()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"deploy only these (of {', '.join(d.name for d in DEPLOYMENTS)})")
    parser.add_argument("--schedules-active", action="store_true",
                        help="turn the nightly schedule on (it is deployed paused by default)")
    parser.add_argument("--config", action="append", metavar="NAME=FILE", default=[],
                        help="start deployment NAME from FILE instead of its configs/ file")
    parser.add_argument("--stages-on", action="append", metavar="POOL", default=[],
                        help="deploy only the stage flow (slmflow-stage/POOL) on POOL (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the plan; contact no server")
    return parser


Planned = tuple[str, str, "DeploymentSpec | None", Any]  # (name, pool, spec or None: the stage flow, deployment)


def plan(args: argparse.Namespace) -> tuple[list[Planned], str | None]:
    """What to deploy, or an error message."""
    names = {d.name for d in DEPLOYMENTS}
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        return [], (f"--only {', '.join(unknown)}: no such deployment; choose from "
                    f"{', '.join(sorted(names))}")
    if args.stages_on:
        return [(f"slmflow-stage/{p}", p, None, build_stage_deployment(p))
                for p in args.stages_on], None
    chosen = [d for d in DEPLOYMENTS if not args.only or d.name in args.only]
    for item in args.config:
        name, sep, path = item.partition("=")
        if not sep or name not in names or not path:
            return [], (f"--config {item!r}: expected NAME=FILE with NAME one of "
                        f"{', '.join(sorted(names))}")
        chosen = [replace(d, config=path) if d.name == name else d for d in chosen]
    built: list[Planned] = [(f"{FLOW_NAME}/{spec.name}", spec.work_pool, spec,
                             build_deployment(spec, args.schedules_active)) for spec in chosen]
    return built + [(f"slmflow-stage/{p}", p, None, build_stage_deployment(p))
                    for p in stage_pools(chosen)], None


def describe(spec: DeploymentSpec | None, active: bool, listing: bool = False) -> str:
    """How `--list` (or the deploy message) shows a deployment's origin and schedule."""
    if spec is None:
        return "the stage flow of placed stages"
    if listing:
        return f"config={spec.config}\tschedule={spec.cron or '-'}"
    state = "active" if active else "paused"
    schedule = f", schedule '{spec.cron}' {SCHEDULE_TIMEZONE} ({state})" if spec.cron else ""
    return f"from {spec.config}{schedule}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from slmflow.errors import SlmflowError

    try:  # every config validated before anything is sent
        planned, error = plan(args)
    except SlmflowError as exc:
        error = str(exc)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.list:
        for name, pool, spec, _ in planned:
            print(f"{name}\tpool={pool}\t{describe(spec, args.schedules_active, listing=True)}")
        return 0
    pools = existing_pools()
    missing = [(name, pool) for name, pool, _, _ in planned if pool not in pools]
    if (args.only or args.stages_on) and missing:
        print("error: " + "; ".join(
            f"work pool '{pool}' of deployment {name} does not exist: create it with "
            f"`prefect work-pool create {pool} --type {pool_type(pool)}`" for name, pool in missing),
            file=sys.stderr)
        return 2
    for name, pool, spec, deployment in planned:
        if (name, pool) in missing:
            print(f"skipped {name}: no work pool '{pool}' "
                  f"(`prefect work-pool create {pool} --type {pool_type(pool)}`)")
            continue
        print(f"deployed {name} ({deployment.apply()}) to pool '{pool}' "
              f"{describe(spec, args.schedules_active)}")
    return 0


def pool_type(pool: str) -> str:
    return "azureml" if pool == "azureml" else "process"


if __name__ == "__main__":
    sys.exit(main())
