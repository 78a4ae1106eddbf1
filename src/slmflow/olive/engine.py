"""Olive's top level and `engine` section (Olive 0.13 writes engine keys at the top level), and
the translation of a whole config: sections in dependency order, then the checks across them.
"""

from __future__ import annotations

from typing import Any

from slmflow.olive.core import Map, Noted, Refused, Section, Special, Table, Translator
from slmflow.olive.data import finish_data, handle_data_configs
from slmflow.olive.model import finish_model, handle_input_model
from slmflow.olive.passes import EVALUATOR, finish_passes, handle_passes
from slmflow.olive.systems import SYSTEM_REF, handle_execution_providers, handle_systems

# Systems first (host/target name them), data configs before the passes that name them.
ORDER = ["systems", "data_configs", "azureml_client", "input_model", "passes", "engine"]


def translate(data: dict, source: str) -> Translator:
    """Read every key of an Olive config; raise ConfigError at the first one slmflow cannot honour."""
    t = Translator(source)
    if not (isinstance(data, dict) and ("passes" in data or "input_model" in data)):
        raise t.error("", "not an Olive config: it has neither passes nor input_model")
    top = {**ENGINE.keys, **TOP.keys}
    for key in data:
        if key not in top:
            raise t.unknown(str(key), key, list(top))
    for key in ("input_model", "passes"):
        if key not in data:
            raise t.error(key, "required: an Olive config for slmflow names the base model "
                               "(input_model) and the fine-tuning pass (passes)")
    t.azureml_client = data.get("azureml_client")
    for key in sorted(data, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER)):
        t.apply(top[key], data[key], key, data)
    finish_passes(t)
    finish_model(t)
    finish_data(t)
    return t


def handle_azureml_client(t: Translator, value: Any, path: str, node: dict) -> None:
    if value is not None and not isinstance(value, dict):
        raise t.error(path, "expected a mapping (subscription_id, resource_group, workspace_name)")
    t.note(path, value, "noted: the workspace of azureml_datastore references (their data files "
                        "become azureml://subscriptions/S/resourcegroups/R/workspaces/W/datastores/"
                        "D/paths/P); registry models need none")


LOGS = Noted("slmflow logs each stage to stderr (and to Prefect)")
SAME_INPUTS = Noted("slmflow's cache is keyed by content: a stage is reused only when its inputs "
                    "are the same")
SHARED_CACHE = Refused("set slmflow's `cache_remote` (an fsspec URL such as az://CONTAINER/PREFIX) "
                       "instead; runs that share cache_dir reuse each other's stages",
                       ok=(None, False))
CACHE_DIR = Map("cache_dir", "content-keyed stage outputs, the int4 model among them")
# Olive's CLI commands write cache_config with a null account and container (no shared cache)
CACHE_CONFIG = Table({
    "cache_dir": CACHE_DIR,
    "clean_cache": SAME_INPUTS,
    "clean_evaluation_cache": SAME_INPUTS,
    "account_name": Refused("set slmflow's `cache_remote` (az://CONTAINER/PREFIX) for a shared "
                            "Azure cache"),
    "container_name": Refused("set slmflow's `cache_remote` (az://CONTAINER/PREFIX) for a shared "
                              "Azure cache"),
    "enable_shared_cache": SHARED_CACHE,
    "update_shared_cache": Noted("slmflow uploads each built stage to cache_remote when one is set"),
})
ENGINE = Table({
    "host": SYSTEM_REF,
    "target": SYSTEM_REF,
    "execution_providers": Special(
        handle_execution_providers, "→ `export.execution_provider`: CUDAExecutionProvider → cuda "
        "(and `finetune.device` auto), CPUExecutionProvider → cpu, DmlExecutionProvider → dml; "
        "other providers, or more than one, refused"),
    "output_dir": Map("output_dir", "report.json, report.md and the published model; stage outputs "
                      "go to the shared cache unless cache_dir is set"),
    "cache_dir": CACHE_DIR,
    "log_severity_level": LOGS,
    "ort_log_severity_level": LOGS,
    "ort_py_log_severity_level": LOGS,
    "log_to_file": Noted("slmflow logs to stderr; redirect it to keep a file"),
    "search_strategy": Refused("slmflow runs each pass once; it does not search over pass "
                               "parameters", ok=(None, False)),
    "evaluate_input_model": Noted("slmflow always evaluates the base model too (models.base)"),
    "evaluator": EVALUATOR,
    "packaging_config": Refused("slmflow writes the model folder (model.onnx, genai_config.json, "
                                "tokenizer) under cache_dir; package it yourself"),
    "cache_config": Section(CACHE_CONFIG),
    "clean_cache": SAME_INPUTS,
    "clean_evaluation_cache": SAME_INPUTS,
    "enable_shared_cache": SHARED_CACHE,
    "plot_pareto_frontier": Refused("slmflow does not search, so there is no Pareto frontier",
                                    ok=(None, False)),
    "no_artifacts": Noted("slmflow always writes report.json and keeps the stage outputs"),
})
TOP = Table({
    "input_model": Special(handle_input_model, "the base model (below)"),
    "data_configs": Special(handle_data_configs, "read where a pass names them "
                            "(train_data_config, eval_data_config); a data config no pass names "
                            "is noted as unused"),
    "passes": Special(handle_passes, "a LoRA or QLoRA pass (none when input_model has an "
                      "adapter_path), then optionally MergeAdapterWeights, ModelBuilder and "
                      "ExtractAdapters (not with MergeAdapterWeights), in that order (slmflow "
                      "always exports)"),
    "systems": Special(handle_systems, "named systems (below); they matter where "
                       "engine.host/target or a pass's host names them"),
    "engine": Section(ENGINE),
    "workflow_id": Noted("Olive's run name; slmflow names a run by output_dir"),
    "workflow_host": SYSTEM_REF,
    "azureml_client": Special(handle_azureml_client, "noted: the workspace of azureml_datastore "
                              "references (→ the long form azureml://subscriptions/S/resourcegroups/"
                              "R/workspaces/W/datastores/D/paths/P)"),
    "evaluators": Refused("slmflow evaluates base, merged and exported models itself (accuracy, "
                          "macro F1, latency on the held-out split); remove evaluators",
                          ok=(None, {})),
    "auto_optimizer_config": Refused("slmflow runs a fixed pipeline, not Olive's auto-optimizer; "
                                     "list the passes instead", ok=(None, {})),
})
