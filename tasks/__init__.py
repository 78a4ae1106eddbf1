"""The Prefect task around slmflow's stages: retries, content-keyed caching, persisted results.

One task runs any stage of `slmflow.stages.STAGES` through `run_stage`; `stage_task(name, label,
store)` names it after the stage. The cache key is the stage's own content key (its config
slice, the content hashes of its inputs, the stage version, the store); a persisted result is
trusted only while the folder it points to still hashes to what was recorded, else the record is
dropped and the stage runs again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from slmflow.artifacts import ArtifactRef, read_verified
from slmflow.errors import SlmflowError
from slmflow.stage import run_stage
from slmflow.stages import STAGES
from slmflow.store import Store

RESULTS = "prefect-results"


def results_dir(store: Store) -> Path:
    return store.root / RESULTS


@dataclass
class StageCache(CachePolicy):
    """Cache key = the stage's content key; stale or missing outputs invalidate the record."""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw: Any
    ) -> str | None:
        stage, store = STAGES[inputs["name"]], inputs["store"]
        key = stage.key(inputs["cfg"], store, **inputs["named"])
        if read_verified(store.folder(stage.kind, key)) is None:
            (results_dir(store) / key).unlink(missing_ok=True)
        return key


# torch's CUDA/MPS ("out of memory") and CPU ("DefaultCPUAllocator: can't allocate memory ...
# Error code 12 (Cannot allocate memory)") allocation failures: a retry would fail the same way.
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")
# Errors of code or arguments: the same inputs fail the same way on every try.
_DETERMINISTIC = (TypeError, ValueError, AttributeError, NameError, ImportError, KeyError,
                  IndexError, AssertionError, NotImplementedError)


def is_transient(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Retry what may pass on a second try; never config, data, check or out-of-memory errors."""
    try:
        state.result()
    except SlmflowError as exc:
        return exc.retryable
    except (MemoryError, *_DETERMINISTIC):
        return False
    except Exception as exc:  # noqa: BLE001 - the policy looks at every other failure
        oom = any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)  # torch's, any device
        text = str(exc).lower()
        return not oom and not any(m in text for m in _OOM_MESSAGES)
    return False


def progress_artifact():
    """A progress callback that keeps the run's `finetune-progress` artifact moving."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact: dict[str, Any] = {}

    def on_progress(step: int, total: int, last: dict[str, float]) -> None:
        if "id" not in artifact:
            artifact["id"] = create_progress_artifact(
                0.0, key="finetune-progress", description="Fine-tuning steps done (%)")
            artifact["sent"] = 0.0
        # an API call per step cost ~5 s of a 100-step run: at most one a second, and the last
        now = time.monotonic()
        if step < total and now - artifact["sent"] < 1.0:
            return
        artifact["sent"] = now
        loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
        update_progress_artifact(artifact["id"], 100.0 * step / max(total, 1),
                                 description=f"step {step}/{total}{loss}")

    return on_progress


@task(retries=2, retry_delay_seconds=[3, 9], retry_condition_fn=is_transient,
      cache_policy=StageCache(), persist_result=True)
def run_stage_task(name: str, cfg: Any, store: Store, named: dict[str, Any]) -> ArtifactRef:
    """Run one stage of `STAGES` (the Prefect task of every stage)."""
    return run_stage(STAGES[name], cfg, store, log=get_run_logger().info,
                     progress=progress_artifact(), **named)


def stage_task(name: str, label: str, store: Store) -> Task:
    """The task of stage `name`, its run named `label`, its results persisted beside the store."""
    return run_stage_task.with_options(name=name, task_run_name=label,
                                       result_storage=results_dir(store))  # a Path: a folder
