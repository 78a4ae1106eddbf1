"""Stage 1: resolve the base model and materialize it as a local safetensors folder.

A local transformers folder is used where it is (the stage records a pointer and its content
hash); a GGUF file is converted to safetensors once; a hub id is downloaded with
`from_pretrained` and saved; an AzureML registry model is downloaded with azure-ai-ml
(`slmflow.azureml.inputs`) and its transformers folder saved.

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
from slmflow.stages import release_memory

VERSION = 1


def model_source_path(cfg: BaseModelConfig) -> Path | None:
    """The checked local file or folder of the base model; None for a hub id. Reads no weights."""
    if cfg.source == "azureml_registry":
        return None  # downloaded by the stage
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
        return path
    return None


def model_source_ref(cfg: BaseModelConfig) -> ArtifactRef:
    """A content reference to where the base model comes from (hashes local files only)."""
    path = model_source_path(cfg)
    if path is not None:
        return source_ref("model_source", str(path))
    if cfg.source == "azureml_registry":
        # A registry model version is immutable: its URI is its identity.
        from slmflow.azureml.inputs import registry_model

        uri = registry_model(cfg).uri
        digest = stable_hash({"azureml_registry_model": uri})
        return ArtifactRef(kind="model_source", uri=uri, sha256=digest, key=digest[:24])
    # A hub id: the id and revision are all we can key on before downloading.
    spec = cfg.name_or_path
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


# GGUF tensor names (llama.cpp's) → the transformers module names LoRA targets.
GGUF_MODULES = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "attn_qkv": "qkv_proj", "ffn_gate": "gate_proj", "ffn_up": "up_proj",
    "ffn_down": "down_proj", "token_embd": "embed_tokens", "output": "lm_head",
}
GGUF_MODULES_BY_ARCH = {"phi3": {"ffn_up": "gate_up_proj"}}  # Phi-3's ffn_up is gate and up fused
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: Path) -> tuple[str, list[tuple[str, list[int]]]]:
    """The architecture and the (name, shape) of every tensor of a GGUF file, from its header.

    A direct walk over the header (gguf's GGUFReader also decodes every metadata array, ~2.5 s
    for SmolLM2's 49k-token vocabulary; this takes milliseconds). Raises ValueError when the file
    is not a little-endian GGUF (v2 or v3).
    """
    import mmap
    import struct

    if path.stat().st_size < 24:
        raise ValueError("it is too short to be a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        pos = 4

        def take(fmt: str) -> int:
            nonlocal pos
            (value,) = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = take("Q")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8", "replace")

        def skip(vtype: int) -> None:
            nonlocal pos
            if vtype == _GGUF_STRING:
                n = take("Q")
                pos += n
            elif vtype == _GGUF_ARRAY:
                etype, count = take("I"), take("Q")
                if etype in _GGUF_SCALAR_SIZES:
                    pos += _GGUF_SCALAR_SIZES[etype] * count
                else:
                    for _ in range(count):
                        skip(etype)
            elif vtype in _GGUF_SCALAR_SIZES:
                pos += _GGUF_SCALAR_SIZES[vtype]
            else:
                raise ValueError(f"unknown metadata type {vtype} at byte {pos}")

        version = take("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian or unsupported); slmflow reads v2 and v3")
        n_tensors, n_kv = take("Q"), take("Q")
        arch = "?"
        for _ in range(n_kv):
            key, vtype = string(), take("I")
            if key == "general.architecture" and vtype == _GGUF_STRING:
                arch = string()
            else:
                skip(vtype)
        tensors = []
        for _ in range(n_tensors):
            name = string()
            shape = [take("Q") for _ in range(take("I"))]
            pos += 4 + 8  # type, offset
            tensors.append((name, shape))
    return arch, tensors


def describe_gguf(path: Path) -> dict[str, Any]:
    """describe_model's facts for a GGUF file: architecture, parameters, linear-module names.

    Module names are mapped to the transformers names the converted model will have
    (attn_q → q_proj, ...), so finetune.target_modules can be checked before converting.
    """
    import struct

    try:
        arch, tensors = read_gguf_header(path)
    except struct.error:
        raise ValueError("its header is truncated") from None
    mapping = GGUF_MODULES | GGUF_MODULES_BY_ARCH.get(arch, {})
    names: set[str] = set()
    params = 0
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        params += n
        parts = name.split(".")
        if parts[-1] == "weight" and len(shape) == 2 and parts[-2] in mapping:
            names.add(mapping[parts[-2]])
    return {
        "architecture": GGUF_ARCHITECTURES.get(arch, f"{arch} (GGUF)"),
        "model_type": arch,
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
        elif cfg.source == "azureml_registry":
            from slmflow.azureml.inputs import download_registry_model

            download_registry_model(cfg, target, log)
        else:
            _download(cfg, target, log)
        return describe_model(target)

    ref = run_stage(KIND, key, store, [source], build, log=log)
    release_memory()
    return ref


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
