"""Check a whole run before any heavy work, and resolve its inputs once.

Files, data rows, the model source and its modules, the output folder, memory for merge and
export. Loads no model (the base model's modules are read from safetensors or GGUF headers).
Every problem is a ConfigError/DataError with the key, file and line, and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef, stable_hash
from slmflow.config import BaseModelConfig, PipelineConfig, eval_set_name
from slmflow.dataio import load_examples
from slmflow.errors import ConfigError, DataError
from slmflow.inputs import INPUTS_MEMO, RunInputs, data_source, model_source, model_source_path
from slmflow.store import Store


def check_output_dir(config: PipelineConfig) -> Path:
    """output_dir (and cache_dir) must be folders we can create and write."""
    from slmflow.cache import cache_dir_of

    for field, value in (("output_dir", config.output_dir), ("cache_dir", str(cache_dir_of(config)))):
        if value is None:
            continue
        path = Path(value).expanduser().resolve()
        probe = path
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(f"{field}: {probe} is a file, not a folder; choose another {field}")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"{field}: {probe} is not writable; choose a folder you can write")
    return Path(config.output_dir).expanduser().resolve()


def describe_local_model(folder: Path) -> dict[str, Any]:
    """describe_model of a local transformers folder, with its read errors as ConfigErrors."""
    from slmflow.folders import describe_model

    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        have = f" (it has {', '.join(found[:3])})" if found else ""
        raise ConfigError(
            f"model.name_or_path: {folder} has no .safetensors weights{have}; slmflow loads "
            "safetensors only: re-save the model with save_pretrained(..., safe_serialization=True)"
        )
    try:
        return describe_model(folder)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{folder / 'config.json'}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}; "
            "fix the model's config.json or download the model again"
        ) from None
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type; any failure is the finding
        raise ConfigError(
            f"model.name_or_path: cannot read the safetensors headers in {folder} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "download or save the model again"
        ) from None


def describe_gguf_model(path: Path) -> dict[str, Any]:
    """describe_gguf of a .gguf file, with a file that is no GGUF as a ConfigError."""
    from slmflow.gguf_model import describe_gguf

    try:
        return describe_gguf(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(
            f"model.name_or_path: {path} is not a readable GGUF file ({exc}); point it at a .gguf "
            "model file, or set model.source=hf for a transformers folder"
        ) from None


_UNREACHABLE = {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError",
                "ConnectionError", "Timeout", "ReadTimeout"}


def check_hub_model(cfg: BaseModelConfig, source: ArtifactRef, store: Store) -> None:
    """A hub id that is no local folder must be in the stage store, the Hugging Face cache or on the hub.

    Without this a mistyped local path ("models/phi-3-mini" run from another folder) reads as a
    hub id, and the base-model stage retries the download for minutes before failing.
    """
    from slmflow.artifacts import MANIFEST
    from slmflow.stages.base_model import STAGE

    if (store.folder(STAGE.kind, STAGE.key(cfg, store, source=source)) / MANIFEST).is_file():
        return  # downloaded by an earlier run (the stage verifies its content)
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import (
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    spec = cfg.name_or_path
    not_local = (
        f"model.name_or_path: {spec!r} is not a local folder "
        f"({Path(spec).expanduser().resolve()} does not exist)"
    )
    try:
        cached = try_to_load_from_cache(spec, "config.json", revision=cfg.revision)
    except HFValidationError:
        raise ConfigError(f"{not_local} and not a Hugging Face hub id (ORG/NAME); fix the path") from None
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{not_local} and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; fix the path, "
            f"or download the model (hf download {spec}) and point model.name_or_path at it"
        )
    from slmflow.secrets import get_secret

    try:
        model_info(spec, revision=cfg.revision, timeout=10, token=get_secret("HF_TOKEN", "hf-token"))
    except RevisionNotFoundError:
        raise ConfigError(
            f"model.revision: {cfg.revision!r} is not a branch, tag or commit of {spec} on the "
            "Hugging Face hub; fix model.revision or leave it out"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{not_local} and not a model on the Hugging Face hub (a private one needs HF_TOKEN); "
            "fix the path or the hub id"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the hub's transport errors have no common base
        if isinstance(exc, OSError) or _UNREACHABLE & {c.__name__ for c in type(exc).__mro__}:
            raise ConfigError(
                f"{not_local}, and the Hugging Face hub is unreachable ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no answer'}); connect to the "
                "network, or download the model and point model.name_or_path at the folder"
            ) from None
        # Anything else (a hub outage, rate limit) may pass on a retry: the stage will try.


def base_model_facts(cfg: BaseModelConfig) -> dict[str, Any] | None:
    """Architecture, parameter count and linear modules of the base model, from headers only.

    None for a hub id (nothing local to read before the download).
    """
    path = model_source_path(cfg)
    if path is None:
        return None
    return describe_gguf_model(path) if cfg.source == "gguf" else describe_local_model(path)


def check_memory_for_merge_and_export(config: PipelineConfig, params: int, store: Store) -> None:
    """Stop before fine-tuning when this machine could not merge or export the model afterwards.

    Memory only: the stages check memory again, and disk, when they start (the run fills the disk
    as it goes, so the free space now says little about the free space then).
    """
    from slmflow.resources import check_resources, estimate_export, estimate_merge

    need = max(estimate_merge(params)[0], estimate_export(params, config.export.precision)[0])
    check_resources("merge and export (checked before fine-tuning)", need, 0, store.root)


def store_for(config: PipelineConfig) -> Store:
    """Where the run's content-keyed stage outputs live (and the remote they mirror)."""
    from slmflow.cache import cache_dir_of

    return Store.at(cache_dir_of(config), config.cache_remote)


def fingerprint(config: PipelineConfig) -> str:
    """What a run's resolved inputs depend on: model, data, a given adapter, where outputs go."""
    dumped = config.model_dump(mode="json")
    return stable_hash({**{k: dumped[k] for k in ("model", "data", "output_dir", "cache_dir",
                                                  "cache_remote")},
                        "extra_eval_files": config.extra_eval_files(),
                        **({"adapter_path": config.finetune.adapter_path}
                           if config.finetune.adapter_path else {})})


def check_rows_per_label(config: PipelineConfig, where: str, rows: list[dict[str, Any]]) -> None:
    """Without an eval file, every label needs 2 rows: one to train on, one held out."""
    column = config.data.label_column
    missing = [label for label in config.data.labels
               if sum(r[column] == label for r in rows) < 2]
    if missing:
        raise DataError(
            f"{where}: labels {missing} have fewer than 2 rows, so a train/eval split "
            "cannot hold each out; add rows or give data.eval_file"
        )


def check_given_adapter(config: PipelineConfig, facts: dict[str, Any] | None,
                        store: Store) -> ArtifactRef:
    """finetune.adapter_path: a LoRA adapter folder that fits the base (its target modules, and
    its weights' shapes where the base is a local transformers folder: a GGUF base is checked by
    the stage, once converted); keyed by its files' content."""
    from slmflow import peft_adapter as pa
    from slmflow.artifacts import content_ref

    folder = pa.adapter_folder(config.finetune.adapter_path)
    adapter = pa.read_adapter_config(folder)
    if facts is not None:
        pa.check_targets(adapter, facts["linear_modules"], facts["architecture"])
    if config.export.adapters == "separate":  # else refused only by the base build, much later
        from slmflow.onnx_adapters import BUILDER_PROJECTIONS, unsupported_targets

        bad = unsupported_targets(sorted(adapter["target_modules"]))
        if bad:
            raise ConfigError(
                f"finetune.adapter_path: the adapter adapts {bad}; with export.adapters=separate "
                f"the model builder carries LoRA branches on {sorted(BUILDER_PROJECTIONS)} only: "
                "use export.adapters=merged")
    local = model_source_path(config.model)
    if local is not None and config.model.source == "hf":
        pa.check_shapes(folder, local, adapter)
    return content_ref("adapter_source", folder, store.root / INPUTS_MEMO)


def validate_run(config: PipelineConfig) -> RunInputs:
    """Check everything a run needs and resolve its inputs (call once per run)."""
    from slmflow.placement import check_placement
    from slmflow.stages.finetune import check_target_modules, world_of
    from slmflow.tracking_check import check_tracking

    output_dir = check_output_dir(config)
    check_tracking(config.tracking)  # the MLflow server answers now, not after the fine-tune
    store = store_for(config)
    check_placement(config)  # pools and their stage deployments exist (only where placed)
    given = config.finetune.adapter_path is not None  # nothing trained: no training checks
    if not given:
        world_of(config.finetune)  # processes, nodes, backend: refused here with the fix
    facts = base_model_facts(config.model)  # headers only: seconds, also for a large model
    adapter_src = check_given_adapter(config, facts, store) if given else None
    if facts is not None:
        if not given:
            check_target_modules(config.finetune, ArtifactRef(
                kind="model_source", uri=config.model.name_or_path, sha256="", key="", meta=facts))
        check_memory_for_merge_and_export(config, facts["parameters"], store)
    train_src = data_source(config.data.train_file, "data.train_file", store)
    eval_src = (data_source(config.data.eval_file, "data.eval_file", store)
                if config.data.eval_file else None)
    train_rows = load_examples(train_src.uri, config.data)
    eval_rows = load_examples(eval_src.uri, config.data) if eval_src else None
    extra = {}
    for i, spec in enumerate(config.extra_eval_files()):
        extra[eval_set_name(spec)] = data_source(spec, f"evaluate.extra_files[{i}]", store)
        load_examples(extra[eval_set_name(spec)].uri, config.data)  # every row checked now
    if eval_rows is None:
        check_rows_per_label(config, train_src.uri, train_rows)
    model_src = model_source(config.model, store.root / INPUTS_MEMO)  # last: hashing a large
    # local model takes a while (the first time: later, only files that changed are read)
    if model_src.uri.startswith("hf://"):
        check_hub_model(config.model, model_src, store)
    return RunInputs(
        fingerprint=fingerprint(config), store=store, output_dir=str(output_dir),
        model_source=model_src, train_source=train_src, eval_source=eval_src,
        adapter_source=adapter_src, extra_sources=extra, model_facts=facts,
        train_rows=len(train_rows), eval_rows=len(eval_rows) if eval_rows is not None else None,
    )
