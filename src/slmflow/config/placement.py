"""The placement section (`placement.*`): where each stage runs."""

from __future__ import annotations

from pydantic import Field

from slmflow.config.base import _Config

POOL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _pool(title: str, what: str) -> object:
    return Field(
        None,
        title=title,
        description=f"Work pool that runs {what}, as its own flow run (deployment "
        "slmflow-stage/POOL); empty: the flow's own process.",
        pattern=POOL_NAME,
        max_length=100,
    )


class PlacementConfig(_Config):
    """Where each stage runs: in the flow's own process (empty), or on a work pool as a sub-run.

    A placed stage runs as a flow run of the deployment slmflow-stage/POOL (deployments/deploy.py
    makes one per pool), started by the pipeline's flow run and shown under it. Stages hand each
    other their outputs through the shared store, so placing any stage needs cache_remote.
    """

    base_model: str | None = _pool("Base model pool", "the base-model stage")
    prepare_data: str | None = _pool("Data preparation pool", "the data preparation")
    finetune: str | None = _pool("Fine-tune pool", "the fine-tune")
    merge: str | None = _pool("Merge pool", "the merge")
    export: str | None = _pool("Export pool", "the export")
    evaluate: str | None = _pool("Evaluation pool", "the evaluations (base, merged, exported)")
    recipe_candidates: str | None = Field(
        None,
        title="Recipe candidates pool",
        description="With export.recipe auto: the work pool each candidate runs on, as one "
        "sub-run that exports and evaluates one recipe, export.search.max_parallel at a time; "
        "empty: as export and evaluate are placed.",
        pattern=POOL_NAME,
        max_length=100,
    )
    start_timeout_seconds: float = Field(
        600,
        gt=0,
        title="Start timeout (s)",
        description="A placed stage whose flow run no worker has taken after this long fails, "
        "naming the pool (start a worker: prefect worker start --pool POOL).",
    )

    def pools(self) -> dict[str, str]:
        """{placement key: work pool} of the placed stages."""
        return {name: pool for name, pool in self.model_dump().items()
                if name != "start_timeout_seconds" and pool}
