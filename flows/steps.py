"""What the pipeline asks its runner for: steps (stage calls), alone or chained.

A step is one call of a stage (its name in `STAGES`, the run label, its config slice, named
inputs and options). A chain is steps run one after the other, each later step fed the output
before it; the recipe search chains a candidate's export and its evaluation. A runner of single
stages (`run_plain`, `run_prefect_task`) runs a chain step by step (`sequential`); the placed
runner (flows/placed.py) runs a chain placed on one pool as one flow run there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slmflow.artifacts import ArtifactRef
from slmflow.store import Store

# run(stage name, label, its config, store, its inputs and options) -> (reference, cached)
Runner = Callable[[str, str, Any, Store, dict[str, Any]], tuple[ArtifactRef, bool]]
Outcome = tuple[ArtifactRef, bool, float]  # (reference, cached, seconds)


@dataclass(frozen=True)
class Step:
    """One stage call of the DAG."""

    name: str  # the stage, a key of STAGES
    label: str  # the run's name for it: "finetune", "evaluate_merged", "export[int8]"
    cfg: Any  # its config slice
    named: dict[str, Any] = field(default_factory=dict)  # inputs (ArtifactRef) and options
    feed: str | None = None  # the input that takes the previous step's output, in a chain
    where: str = ""  # its placement key (default: the stage's name)

    @property
    def placement_key(self) -> str:
        return self.where or self.name

    def inputs(self, previous: ArtifactRef | None) -> dict[str, Any]:
        """Its named inputs, with the previous step's output where it is fed one."""
        return {**self.named, self.feed: previous} if self.feed else dict(self.named)


ChainRunner = Callable[[list[Step], Store], list[Outcome]]


def sequential(run: Runner) -> ChainRunner:
    """A chain runner that runs each step through `run`, timing each."""

    def run_chain(steps: list[Step], store: Store) -> list[Outcome]:
        outcomes: list[Outcome] = []
        previous = None
        for step in steps:
            t0 = time.perf_counter()
            previous, cached = run(step.name, step.label, step.cfg, store, step.inputs(previous))
            outcomes.append((previous, cached, time.perf_counter() - t0))
        return outcomes

    return run_chain


def chain_runner(run: Runner | Any) -> ChainRunner:
    """`run.chain` where the runner has one (the placed runner), else `sequential(run)`."""
    return getattr(run, "chain", None) or sequential(run)
