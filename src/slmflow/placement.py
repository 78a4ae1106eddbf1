"""Stages on work pools: what a placed stage's inputs and outputs must be, wherever they arrive.

A stage placed on a work pool (`placement` in the config) runs as a flow run of the deployment
`slmflow-stage/POOL` (flows/placed.py). Stage outputs travel between the flow and its sub-runs
through the shared store (`cache_remote`); `arrive` takes a reference made elsewhere and returns
the same output in this machine's store, verified by its content hash. `check_placement` refuses
a run whose pools or stage deployments do not exist, before any stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints

from pydantic import BaseModel

from slmflow.artifacts import ArtifactRef, hash_path
from slmflow.config import PipelineConfig
from slmflow.errors import ConfigError
from slmflow.stage import Stage
from slmflow.store import Log, Store

STAGE_FLOW = "slmflow-stage"  # the flow of flows/placed.py; one deployment of it per work pool
STAGE_STORE = "SLMFLOW_STAGE_STORE"  # a worker's local store (default: stage-store/ in its folder)


def deployment_name(pool: str) -> str:
    return f"{STAGE_FLOW}/{pool}"


def deploy_hint(pool: str, kind: str = "process") -> str:
    return (f"create it with `prefect work-pool create {pool} --type {kind}` and deploy the stage "
            f"flow on it with `python deployments/deploy.py --stages-on {pool}`")


def worker_store(remote: str) -> Store:
    """The store of a sub-run: a folder of the worker's own, mirroring the run's remote."""
    return Store.at(os.environ.get(STAGE_STORE, "stage-store"), remote)


def config_type(stage: Stage) -> type[BaseModel]:
    """The config slice class a stage's build takes (its `cfg` annotation)."""
    return get_type_hints(stage.build)["cfg"]


def decode_named(stage: Stage, named: Mapping[str, Any]) -> dict[str, Any]:
    """Named inputs and options as they arrive in JSON: the inputs back into references."""
    return {n: ArtifactRef.model_validate(v) if n in stage.inputs and v is not None else v
            for n, v in named.items()}


def arrive(ref: ArtifactRef, store: Store, log: Log = print) -> ArtifactRef:
    """`ref`, made elsewhere, as an output of this machine's store (or a file it can read).

    A stage output is pulled from the shared store and must hash to `ref`'s content hash; a
    pointer to a model folder is recorded again where that folder is here too; an input file of
    the run must be at the same path with the same content; an input known by name passes.
    """
    from slmflow.stages import STAGES

    if ref.kind in {s.kind for s in STAGES.values()}:
        got = store.pull(ref.kind, ref.key, log=log)
        if got is None and ref.meta.get("external_model_dir"):
            from slmflow.stages.base_model import adopt_pointer

            got = adopt_pointer(ref, store, log)
        if got is None:
            raise ConfigError(
                f"{ref.kind}/{ref.key} is neither in {store.root} nor in {store.remote}: check "
                "that every worker and the flow use the same cache_remote and its credentials")
        if got.sha256 != ref.sha256:
            raise ConfigError(
                f"{ref.kind}/{ref.key}: the store holds content {got.sha256[:12]}, the run "
                f"expects {ref.sha256[:12]} (two builds of one key differ); remove "
                f"{store.folder(ref.kind, ref.key)} and its copy in {store.remote}, then run again")
        return got
    if ref.uri.startswith("/") and (not Path(ref.uri).exists() or hash_path(Path(ref.uri)) != ref.sha256):
        raise ConfigError(
            f"{ref.kind} {ref.uri} is not on this machine with the content the run started from; "
            "make it available at that path on every worker, or run the stages that read it in "
            "the flow's own process (leave their placement empty)")
    return ref


def arrive_inputs(stage: Stage, named: Mapping[str, Any], store: Store, log: Log = print) -> dict[str, Any]:
    """`named` with every input reference arrived in `store` (`arrive`); options as they are."""
    return {n: arrive(v, store, log) if n in stage.inputs and v is not None else v
            for n, v in named.items()}


def check_placement(config: PipelineConfig) -> None:
    """Every placed pool, and its stage deployment, exists on the Prefect server the run uses."""
    placed = config.placement.pools()
    if not placed:
        return
    from prefect.settings import get_current_settings

    from slmflow.prefect_api import healthy

    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            "placement: placed stages run as flow runs of a Prefect server their workers reach; "
            "set PREFECT_API_URL (infra/local/up prints it) or clear placement")
    if not healthy(url):
        raise ConfigError(f"placement: the Prefect API at {url} does not answer; start it "
                          "(infra/local/up) or fix PREFECT_API_URL")
    pools, deployed = _pools_and_stage_deployments()
    for key, pool in placed.items():
        if pool not in pools:
            raise ConfigError(f"placement.{key}: work pool '{pool}' does not exist on {url}; "
                              + deploy_hint(pool))
        if deployed.get(pool) != pool:
            raise ConfigError(f"placement.{key}: no deployment {deployment_name(pool)} on work pool "
                              f"'{pool}'; deploy it with `python deployments/deploy.py --stages-on {pool}`")


def _pools_and_stage_deployments() -> tuple[set[str], dict[str, str | None]]:
    """Work pool names, and {stage deployment name: its work pool}, read from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        with get_client(sync_client=True) as client:
            pools = {p.name for p in client.read_work_pools()}
            deployments = client.read_deployments(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[STAGE_FLOW])))
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code == 401:
            raise ConfigError(
                "placement: the Prefect API refused this client (401): set PREFECT_API_AUTH_STRING "
                "to the server's PREFECT_SERVER_API_AUTH_STRING (docs/server.md)") from None
        raise
    return pools, {d.name: d.work_pool_name for d in deployments}
