"""Stage 1: resolve the base model and materialize it as a local safetensors folder.

A local transformers folder is used where it is (the stage records a pointer and its content
hash); a GGUF file is converted to safetensors once; a hub id is downloaded with
`from_pretrained` and saved. AzureML registry models are resolved by the AzureML target.

Run as (outside Prefect):
    python -m slmflow.stages.base_model CONFIG.yaml
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slmflow.artifacts import (
    ArtifactRef,
    resolve_path,
    run_stage,
    source_ref,
    stable_hash,
    stage_key,
)
from slmflow.config import BaseModelConfig
from slmflow.errors import ConfigError

VERSION = 1


def model_source_ref(cfg: BaseModelConfig) -> ArtifactRef:
    """A content reference to where the base model comes from (cheap: hashes local files only)."""
    if cfg.source == "azureml_registry":
        raise ConfigError(
            f"model.source=azureml_registry ({cfg.registry_name}/{cfg.name_or_path}:{cfg.version}) "
            "runs on the AzureML target, which this build does not include yet; download the "
            "model and set model.source=hf with model.name_or_path=LOCAL_FOLDER"
        )
    spec = cfg.name_or_path
    local = spec.startswith(("pkg:", ".", "/")) or Path(spec).expanduser().exists()
    if cfg.source == "gguf" or local:
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
        return source_ref("model_source", str(path))
    # A hub id: the id and revision are all we can key on before downloading.
    digest = stable_hash({"hub_id": spec, "revision": cfg.revision})
    return ArtifactRef(kind="model_source", uri=f"hf://{spec}", sha256=digest, key=digest[:24])


def model_dir(ref: ArtifactRef) -> Path:
    """The folder holding the model files of a base/merged model reference.

    Model files live in `model/` of the stage folder, or where the user keeps them (a local
    folder used in place).
    """
    external = ref.meta.get("external_model_dir")
    return Path(external) if external else ref.path / "model"


def describe_model(folder: Path) -> dict[str, Any]:
    """Architecture, parameter count and linear-module names, from config and headers only."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    names: set[str] = set()
    params = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                params += n
                if key.endswith(".weight") and len(shape) == 2:
                    names.add(key[: -len(".weight")].rsplit(".", 1)[-1])
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "parameters": params,
        "linear_modules": sorted(names),
    }


def _hf_token() -> str | None:
    from slmflow.secrets import get_secret

    return get_secret("HF_TOKEN", block="hf-token")


KIND = "base_model"


def base_model_key(cfg: BaseModelConfig, store: Path, source: ArtifactRef) -> str:
    return stage_key(KIND, VERSION, cfg, [source], store)


def materialize_base_model(
    cfg: BaseModelConfig, store: Path, source: ArtifactRef, log=print
) -> ArtifactRef:
    """Give back a reference to a local safetensors folder of the base model."""
    key = base_model_key(cfg, store, source)

    def build(out: Path, work: Path) -> dict[str, Any]:
        if cfg.source == "hf" and not source.uri.startswith("hf://"):
            folder = Path(source.uri)
            (out / "source.json").write_text(json.dumps({"path": str(folder), "sha256": source.sha256}))
            return {"external_model_dir": str(folder), **describe_model(folder)}
        target = out / "model"
        if cfg.source == "gguf":
            from slmflow.gguf_convert import convert_gguf

            log(f"converting {source.uri} to safetensors (once)")
            convert_gguf(Path(source.uri), target)
        else:
            _download(cfg, target, log)
        return describe_model(target)

    return run_stage(KIND, key, store, [source], build, log=log)


def _download(cfg: BaseModelConfig, target: Path, log=print) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"downloading {cfg.name_or_path} (revision {cfg.revision or 'main'})")
    token = _hf_token()
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "token": token}
    tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.name_or_path, dtype=torch.float32, use_safetensors=True, **kwargs
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    os.sync()


if __name__ == "__main__":
    import sys

    from slmflow.configio import load_config

    config = load_config(sys.argv[1] if len(sys.argv) > 1 else None)
    store = Path(config.cache_dir or Path(config.output_dir) / "cache")
    print(materialize_base_model(config.model, store, model_source_ref(config.model)).model_dump_json(indent=2))
