"""Stages on the compute they need: a placed stage runs as a flow run on its work pool.

`placement` in the config names a work pool per stage (and for the recipe candidates). The
pipeline's flow run computes each placed stage's key; a stage whose output is in the store
already (here or in `cache_remote`) is not dispatched at all. Otherwise `run_deployment` starts
a flow run of the deployment `slmflow-stage/POOL` (the flow `slmflow_stage` below, one deployment
per pool: deployments/deploy.py) as a sub-run of the pipeline's flow run, so the UI shows it
under the stage's task. The sub-run pulls its inputs from the shared store (verified by content
hash), checks that it computes the same key, runs the stage as the same Prefect task as in
process (retries and their rules, logs, the progress artifact), pushes the output and lists it
in a table artifact; the parent pulls that output into its own store, verified again. A sub-run
that fails, crashes or is cancelled fails the stage with its message and a link to it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from flows.steps import Outcome, Runner, Step, sequential
from slmflow.artifacts import ArtifactRef
from slmflow.config import PlacementConfig
from slmflow.errors import ConfigError, PlacedStageError
from slmflow.placement import (
    STAGE_FLOW,
    arrive,
    arrive_inputs,
    config_type,
    decode_named,
    deployment_name,
    worker_store,
)
from slmflow.stages import STAGES
from slmflow.store import Log, Store

OUTPUT_ARTIFACT = "slmflow-stage-output"


class StageCall(BaseModel):
    """One stage for a sub-run, as the pipeline's flow run computed it (JSON)."""

    model_config = ConfigDict(extra="forbid")

    stage: str = Field(description="The stage: base_model, prepare_data, finetune, merge, export "
                       "or evaluate.")
    label: str = Field(description="Its name in the run: finetune, evaluate_merged, export[int8].")
    cfg: dict[str, Any] = Field(description="Its config slice.")
    named: dict[str, Any] = Field(default_factory=dict,
                                  description="Its inputs (stage output references) and options.")
    key: str | None = Field(None, description="The key the pipeline computed; none for a stage "
                            "fed the output of the one before (its key depends on that output).")
    feed: str | None = Field(None, description="The input that takes the previous stage's output.")


# ---- the sub-run, on a worker of the pool -----------------------------------------------------
@flow(name=STAGE_FLOW, log_prints=True, validate_parameters=True)
def slmflow_stage(calls: list[StageCall], remote: str) -> list[dict[str, Any]]:
    """Run stages placed on this work pool for a slmflow pipeline run.

    Args:
        calls: The stages, in order, with their config slices, inputs and keys.
        remote: The shared store (cache_remote) inputs come from and outputs go to.
    """
    store = worker_store(remote)
    log = get_run_logger().info
    rows: list[dict[str, Any]] = []
    previous: ArtifactRef | None = None
    for call in calls:
        previous, cached, seconds = run_call(call, store, previous, log)
        rows.append({"stage": call.label, "kind": previous.kind, "key": previous.key,
                     "sha256": previous.sha256, "cached": cached, "seconds": round(seconds, 3),
                     "ref": previous.model_dump_json()})
    create_table_artifact(rows, key=OUTPUT_ARTIFACT,
                          description="What this sub-run built or reused (content hashes)")
    return [{k: v for k, v in row.items() if k != "ref"} for row in rows]


def run_call(call: StageCall, store: Store, previous: ArtifactRef | None, log: Log) -> Outcome:
    """One stage of a sub-run: inputs arrived and verified, key checked, then its task."""
    from tasks import stage_task

    stage = STAGES[call.stage]
    cfg = config_type(stage).model_validate(call.cfg)
    t0 = time.perf_counter()
    named = arrive_inputs(stage, decode_named(stage, call.named), store, log)
    log(f"{call.label}: inputs here and verified in {time.perf_counter() - t0:.1f} s")
    if call.feed:
        named[call.feed] = previous  # made by this sub-run: in this store already
    key = stage.key(cfg, store, **named)
    if call.key is not None and key != call.key:
        raise ConfigError(
            f"{call.label}: this worker computes key {key}, the pipeline {call.key}: the worker "
            "runs another slmflow (stage versions differ) or sees another cache_remote; install "
            "the pipeline's slmflow version on the pool's workers")
    t0 = time.perf_counter()
    state = stage_task(stage.name, call.label, store)(stage.name, cfg, store, named,
                                                      return_state=True)
    ref = state.result()  # raises the stage's own error: the sub-run fails with its message
    return ref, state.name == "Cached" or ref.cached, time.perf_counter() - t0


# ---- the pipeline's side ----------------------------------------------------------------------
@dataclass(frozen=True)
class PlacedRunner:
    """Runs each step where `placement` puts it: here through `fallback`, or on its pool."""

    placement: PlacementConfig
    fallback: Runner
    poll_seconds: float = 1.0

    def __call__(self, name: str, label: str, cfg: Any, store: Store,
                 named: dict[str, Any]) -> tuple[ArtifactRef, bool]:
        [(ref, cached, _)] = self.chain([Step(name, label, cfg, named)], store)
        return ref, cached

    def chain(self, steps: list[Step], store: Store) -> list[Outcome]:
        """A chain on one pool is one sub-run; on none, it runs here; across pools, step by step."""
        pools = {getattr(self.placement, step.placement_key) for step in steps}
        if len(pools) > 1:
            outcomes: list[Outcome] = []
            for step in steps:
                previous = outcomes[-1][0] if outcomes else None
                fed = replace(step, named=step.inputs(previous), feed=None)
                outcomes += self.chain([fed], store)
            return outcomes
        pool = pools.pop()
        if pool is None:
            return sequential(self.fallback)(steps, store)
        labels = ", ".join(step.label for step in steps)
        placed = run_placed.with_options(name=steps[0].name, task_run_name=f"{labels} @ {pool}")
        return placed(pool, steps, store, self.placement.start_timeout_seconds, self.poll_seconds)


@task(cache_policy=NO_CACHE, persist_result=False)
def run_placed(pool: str, steps: list[Step], store: Store, start_timeout: float,
               poll_seconds: float) -> list[Outcome]:
    """Steps on `pool`: found in the store, or run by a sub-run there and pulled back."""
    log = get_run_logger().info
    labels = ", ".join(step.label for step in steps)
    t0 = time.perf_counter()
    found = stored(steps, store, log)
    if found is not None:
        log(f"{labels}: in the store already; not dispatched")
        return [(ref, True, (time.perf_counter() - t0) if i == 0 else 0.0)
                for i, ref in enumerate(found)]
    run = start_sub_run(pool, steps, store, labels)
    log(f"{labels}: flow run '{run.name}' on work pool '{pool}' ({run_link(run)})")
    run = wait_for(run, pool, labels, start_timeout, poll_seconds)
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        message = (run.state.message if run.state else "") or "no message"
        raise PlacedStageError(f"{labels}: its flow run '{run.name}' on work pool '{pool}' ended "
                               f"{state}: {message}; see {run_link(run)}")
    ended = time.perf_counter()
    outcomes = arrive_outputs(steps, output_rows(run.id, labels), store, log)
    later = sum(seconds for _, _, seconds in outcomes[1:])
    first = outcomes[0]  # its seconds: the dispatch, the transfers and the stage
    log(f"{labels}: done on '{pool}' in {ended - t0:.1f} s; outputs here and verified in "
        f"{time.perf_counter() - ended:.1f} s")
    return [(first[0], first[1], time.perf_counter() - t0 - later), *outcomes[1:]]


def stored(steps: list[Step], store: Store, log: Log) -> list[ArtifactRef] | None:
    """The outputs of every step, where the store (here or its remote) has them all; else None."""
    refs: list[ArtifactRef] = []
    for step in steps:
        stage = STAGES[step.name]
        key = stage.key(step.cfg, store, **step.inputs(refs[-1] if refs else None))
        ref = store.pull(stage.kind, key, log=log)
        if ref is None:
            return None
        refs.append(ref)
    return refs


def start_sub_run(pool: str, steps: list[Step], store: Store, labels: str) -> Any:
    """A flow run of slmflow-stage/POOL for `steps`, linked under the current task run."""
    from prefect.deployments import run_deployment

    calls = []
    for step in steps:
        stage = STAGES[step.name]
        key = None if step.feed else stage.key(step.cfg, store, **step.named)
        calls.append(StageCall(stage=step.name, label=step.label, key=key, feed=step.feed,
                               cfg=step.cfg.model_dump(mode="json"),
                               named=step.named).model_dump(mode="json"))
    return run_deployment(deployment_name(pool), parameters={"calls": calls, "remote": store.remote},
                          flow_run_name=labels, timeout=0, as_subflow=True)


def wait_for(run: Any, pool: str, labels: str, start_timeout: float, poll_seconds: float) -> Any:
    """The flow run once it ended; cancelled where no worker took it in time or we stop."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    created = time.monotonic()
    with get_client(sync_client=True) as client:
        try:
            while True:
                run = client.read_flow_run(run.id)
                if run.state and run.state.is_final():
                    return run
                if (run.state and run.state.is_scheduled()
                        and time.monotonic() - created > start_timeout):
                    client.set_flow_run_state(run.id, Cancelled(message="no worker took it"),
                                              force=True)
                    raise PlacedStageError(
                        f"{labels}: no worker of work pool '{pool}' took its flow run in "
                        f"{start_timeout:.0f} s; start one (prefect worker start --pool {pool}) "
                        f"or raise placement.start_timeout_seconds; see {run_link(run)}")
                time.sleep(poll_seconds)
        except (KeyboardInterrupt, SystemExit):  # the pipeline stops: so does its sub-run
            client.set_flow_run_state(run.id, Cancelling(), force=True)
            raise


def output_rows(run_id: Any, labels: str) -> list[dict[str, Any]]:
    """The sub-run's table of outputs (one row per stage, with its reference)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[OUTPUT_ARTIFACT])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    if not found:
        raise PlacedStageError(f"{labels}: flow run {run_id} completed without its "
                               f"'{OUTPUT_ARTIFACT}' table; is the worker's slmflow the same?")
    data = found[0].data
    return json.loads(data) if isinstance(data, str) else data


def arrive_outputs(steps: list[Step], rows: list[dict[str, Any]], store: Store,
                   log: Log) -> list[Outcome]:
    """Each sub-run output under the key the pipeline computes for it, pulled and verified."""
    outcomes: list[Outcome] = []
    for step, row in zip(steps, rows, strict=True):
        ref = ArtifactRef.model_validate_json(row["ref"])
        stage = STAGES[step.name]
        key = stage.key(step.cfg, store, **step.inputs(outcomes[-1][0] if outcomes else None))
        if ref.key != key:
            raise PlacedStageError(f"{step.label}: its sub-run returned {ref.kind}/{ref.key}, the "
                                   f"pipeline expects key {key}; run the same slmflow everywhere")
        outcomes.append((arrive(ref, store, log), bool(row["cached"]), float(row["seconds"])))
    return outcomes


def run_link(run: Any) -> str:
    from prefect.utilities.urls import url_for

    return url_for(run) or f"flow run {run.id}"
