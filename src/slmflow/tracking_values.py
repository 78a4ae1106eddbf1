"""What an MLflow run holds, from the config and the report: params (the flattened config, within
MLflow's limits, without secrets) and summary metrics under names every MLflow store takes."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from slmflow.config import PipelineConfig
from slmflow.tracking_check import redact

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (MLflow 3.17)
MAX_KEY = 250           # MAX_ENTITY_KEY_LENGTH
MODEL_METRICS = ("accuracy", "accuracy_constrained", "macro_f1", "latency_ms_p50",
                 "latency_ms_p95", "tokens_per_second", "size_bytes")
FIDELITY_METRICS = ("agreement", "label_kl_mean", "label_kl_p95", "mcnemar_p")
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{dotted key: value as text} of a config dump; lists and nulls as JSON."""
    if isinstance(tree, dict) and tree:
        out: dict[str, str] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    value = tree if isinstance(tree, str) else json.dumps(tree)
    return {prefix.rstrip("."): value}


def config_params(config: PipelineConfig, secrets: list[str]) -> dict[str, str]:
    """The resolved config as MLflow params: values cut to MLflow's 6000 characters (a cut one
    ends with '...'; the whole config is in manifest.json)."""
    params = {}
    for key, value in flatten(config.model_dump(mode="json")).items():
        value = redact(value, secrets)
        if len(value) > MAX_PARAM_VALUE:
            value = value[:MAX_PARAM_VALUE - 3] + "..."
        params[key[:MAX_KEY]] = value
    return params


def metric_key(*parts: str) -> str:
    """A metric name MLflow's stores all take: `evaluate_exported[shifted]` → `evaluate_exported:shifted`."""
    key = "/".join(p.replace("[", ":").replace("]", "") for p in parts)
    return _KEY_CHARS.sub("_", key)[:MAX_KEY]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and not math.isnan(value):
        return float(value)
    return None


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The run's summary metrics from its report (no step metrics)."""
    metrics: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        number = _number(value)
        if number is not None:
            metrics[key] = number

    for set_name, summary in report.get("sets", {}).items():
        for who, figures in summary.get("models", {}).items():
            for name in MODEL_METRICS:
                put(metric_key(set_name, who, name), figures.get(name))
        # every pair the report has: exported_vs_merged, and after QLoRA *_vs_trained, with
        # the separate form exported_merged_vs_merged
        for pair, fidelity in summary.get("fidelity", {}).items():
            for name in FIDELITY_METRICS:
                put(metric_key(set_name, pair, name), (fidelity or {}).get(name))
    gate = report.get("quality_gate", {})
    put("quality_gate/passed", gate.get("passed"))
    put("quality_gate/drop", gate.get("drop"))
    training = report.get("training", {})
    for name in ("train_loss", "final_loss", "steps"):
        put(metric_key("train", name), training.get(name))
    for label, stage in report.get("stages", {}).items():
        put(metric_key("stage", label, "seconds"), stage.get("seconds"))
        put(metric_key("stage", label, "cached"), bool(stage.get("cached")))
    put("total_seconds", report.get("total_seconds"))
    return metrics
