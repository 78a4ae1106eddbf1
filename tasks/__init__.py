"""Prefect tasks around slmflow's stages: retries, content-keyed caching, persisted results.

Each task is the stage function plus policy. The cache key is the stage's own content key (its
config slice, the content hashes of its inputs, the stage version, the store); a persisted result
is trusted only while the folder it points to still hashes to what was recorded, else the record
is dropped and the stage runs again.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from slmflow.artifacts import ArtifactRef, read_verified, stage_dir
from slmflow.config import (
    BaseModelConfig,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    MergeConfig,
)
from slmflow.errors import SlmflowError
from slmflow.stages import base_model, evaluate, export, finetune, merge, prepare_data

RESULTS = "prefect-results"


def results_dir(store: str | Path) -> Path:
    return Path(store) / RESULTS


@dataclass
class StageCache(CachePolicy):
    """Cache key = the stage's content key; stale or missing outputs invalidate the record."""

    kind: str = ""
    key_fn: Callable[..., str] | None = None

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw: Any
    ) -> str | None:
        params = inspect.signature(self.key_fn).parameters
        key = self.key_fn(**{k: v for k, v in inputs.items() if k in params})
        if read_verified(stage_dir(Path(inputs["store"]), self.kind, key)) is None:
            (results_dir(inputs["store"]) / key).unlink(missing_ok=True)
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


def _policy(kind: str, key_fn: Callable[..., str]) -> dict[str, Any]:
    return {
        "retries": 2,
        "retry_delay_seconds": [3, 9],
        "retry_condition_fn": is_transient,
        "cache_policy": StageCache(kind=kind, key_fn=key_fn),
        "persist_result": True,
    }


def _log() -> Callable[[str], None]:
    return get_run_logger().info


@task(name="base_model", **_policy(base_model.KIND, base_model.base_model_key))
def base_model_task(cfg: BaseModelConfig, store: str, source: ArtifactRef) -> ArtifactRef:
    return base_model.materialize_base_model(cfg, Path(store), source, log=_log())


@task(name="prepare_data", **_policy(prepare_data.KIND, prepare_data.dataset_key))
def prepare_data_task(
    cfg: DataConfig,
    store: str,
    base: ArtifactRef,
    train_source: ArtifactRef,
    eval_source: ArtifactRef | None = None,
    loss_on: str = "answer",
) -> ArtifactRef:
    return prepare_data.prepare_data(cfg, Path(store), base, train_source, eval_source, loss_on, log=_log())


@task(name="finetune", **_policy(finetune.KIND, finetune.adapter_key))
def finetune_task(cfg: FinetuneConfig, store: str, base: ArtifactRef, data: ArtifactRef) -> ArtifactRef:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact_id = create_progress_artifact(
        0.0, key="finetune-progress", description="Fine-tuning steps done (%)"
    )

    last_sent = [0.0]

    def on_progress(step: int, total: int, last: dict[str, float]) -> None:
        # an API call per step cost ~5 s of a 100-step run: at most one a second, and the last
        now = time.monotonic()
        if step < total and now - last_sent[0] < 1.0:
            return
        last_sent[0] = now
        pct = 100.0 * step / max(total, 1)
        loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
        update_progress_artifact(artifact_id, pct, description=f"step {step}/{total}{loss}")

    return finetune.finetune(cfg, Path(store), base, data, on_progress=on_progress, log=_log())


@task(name="merge", **_policy(merge.KIND, merge.merged_key))
def merge_task(
    cfg: MergeConfig,
    store: str,
    base: ArtifactRef,
    adapter: ArtifactRef,
    data: ArtifactRef,
    trust_remote_code: bool = False,
) -> ArtifactRef:
    return merge.merge_adapter(cfg, Path(store), base, adapter, data, trust_remote_code, log=_log())


@task(name="export", **_policy(export.KIND, export.onnx_key))
def export_task(cfg: ExportConfig, store: str, merged: ArtifactRef, data: ArtifactRef) -> ArtifactRef:
    return export.export_onnx(cfg, Path(store), merged, data, log=_log())


@task(name="evaluate", **_policy(evaluate.KIND, evaluate.evaluation_key))
def evaluate_task(
    cfg: EvaluateConfig,
    store: str,
    model: ArtifactRef,
    data: ArtifactRef,
    labels: list[str],
    split: str = "eval",
    trust_remote_code: bool = False,
) -> ArtifactRef:
    return evaluate.evaluate_model(
        cfg, Path(store), model, data, labels, split, trust_remote_code, log=_log()
    )


STAGE_TASKS = {
    "base_model": base_model_task,
    "prepare_data": prepare_data_task,
    "finetune": finetune_task,
    "merge": merge_task,
    "export": export_task,
    "evaluate": evaluate_task,
}
