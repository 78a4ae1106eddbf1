"""A pipeline stage: a build function and what its output is keyed by; `run_stage` does the rest.

As in Olive's engine, which hashes (pass, config, input) and lets the pass only build: a stage
module declares a `Stage` (name, the kind of folder it writes, version, its inputs, its options
and what of them the key covers) and a `build(cfg, ws, **inputs, **options) -> meta` that writes
the output into `ws.out`. `run_stage` computes the key once, takes the store's lock, reuses or
builds the folder, and gives memory back. The plain runner and the Prefect task both call it.

The key hashes the stage's kind and version, its config slice, the content hashes of its inputs
(in the stage's order) and the store's location (Olive's lineage hash, over content, not paths):
its remote, or one constant for every local folder, so the key never depends on where the cache
or the output folder lives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel

from slmflow.artifacts import ArtifactRef, stable_hash
from slmflow.store import Log, Store

Progress = Callable[[int, int, dict[str, float]], None]
REQUIRED = object()  # an option without a default


@dataclass(frozen=True)
class Workspace:
    """What a build gets besides its config and inputs."""

    out: Path  # the output folder being written (a temporary sibling, renamed into place after)
    work: Path  # stable across attempts of one key: checkpoints there survive a crash
    log: Log = print
    progress: Progress | None = None  # (step, total, last logged values), for long stages
    store: Store | None = None  # the store the inputs came from (a distributed fine-tune's
    # other nodes fetch them from its remote)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as `run_stage` and the Prefect task see it."""

    name: str  # "finetune": its name in the flow, the CLI logs and Prefect
    kind: str  # "adapter": the store folder it writes
    version: int  # bump when the same inputs would now build something else
    inputs: tuple[str, ...]  # its ArtifactRef inputs, in key order
    build: Callable[..., dict[str, Any]]  # build(cfg, ws, **inputs, **options) -> meta
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # name -> default
    optional: tuple[str, ...] = ()  # inputs that may be None (left out of the key)
    key_config: Callable[..., Any] | None = None  # (cfg, **options) -> what the key hashes; default cfg
    check: Callable[..., None] | None = None  # (cfg, **inputs): cheap refusals before the key

    def arguments(self, named: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """`named` split into (inputs, options), options completed with their defaults."""
        unknown = set(named) - set(self.inputs) - set(self.options)
        missing = [n for n in self.inputs if n not in named and n not in self.optional]
        missing += [n for n, d in self.options.items() if d is REQUIRED and n not in named]
        if unknown or missing:
            raise TypeError(f"stage {self.name}: unknown arguments {sorted(unknown)}, "
                            f"missing {missing}")
        inputs = {n: named.get(n) for n in self.inputs}
        options = {n: named.get(n, d) for n, d in self.options.items()}
        return inputs, options

    def key(self, cfg: Any, store: Store, **named: Any) -> str:
        inputs, options = self.arguments(named)
        sliced = self.key_config(cfg, **options) if self.key_config else cfg
        return stage_key(self.kind, self.version, sliced, self.parents(inputs), store)

    def parents(self, inputs: Mapping[str, ArtifactRef | None]) -> list[ArtifactRef]:
        return [ref for ref in inputs.values() if ref is not None]


def stage_key(kind: str, version: int, config: Any, parents: list[ArtifactRef], store: Store) -> str:
    """The lineage key of a stage output: what it is, from what, by which code, and where."""
    cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return stable_hash({
        "stage": kind,
        "version": version,
        "config": cfg,
        "parents": [p.sha256 for p in parents],
        "store": store.location,
    })[:24]


def run_stage(stage: Stage, cfg: Any, store: Store, *, log: Log = print,
              progress: Progress | None = None, **named: Any) -> ArtifactRef:
    """Run one stage: its checks, its key, then the store reuses or builds its folder."""
    inputs, options = stage.arguments(named)
    if stage.check:
        stage.check(cfg, **inputs)
    key = stage.key(cfg, store, **named)

    def build(out: Path, work: Path) -> dict[str, Any]:
        return stage.build(cfg, Workspace(out, work, log, progress, store), **inputs, **options)

    try:
        return store.build(stage.kind, key, stage.parents(inputs), build, log=log)
    finally:
        release_memory()


def release_memory() -> None:
    """Give the memory a finished stage freed back to the system.

    A stage's models and the Trainer sit in reference cycles until the collector runs, and glibc
    keeps freed heap pages in the process: after fine-tuning, the process held ~570 MB more than
    it used, still held while the next stages (and the export's builder subprocess) ran.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        pass
