"""Stage 1: materialize the base model as a local safetensors folder.

A local transformers folder is used where it is (the stage records a pointer and its content
hash); a GGUF file is converted to safetensors once; a hub id is downloaded with
`from_pretrained` and saved; a plugged-in scheme's model (an AzureML registry model) is
downloaded by its plug-in.

Run as (outside Prefect):
    python -m slmflow.stages.base_model CONFIG.yaml
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef
from slmflow.config import BaseModelConfig
from slmflow.errors import ConfigError
from slmflow.stage import Stage, Workspace
from slmflow.store import Store


def build(cfg: BaseModelConfig, ws: Workspace, source: ArtifactRef) -> dict[str, Any]:
    """A pointer to a local folder, or the model's files written to `model/`."""
    from slmflow.folders import describe_model

    if cfg.source == "hf" and not source.uri.startswith("hf://"):
        folder = Path(source.uri)
        write_pointer(ws.out, folder, source.sha256)
        return {"external_model_dir": str(folder), **describe_model(folder)}
    target = ws.out / "model"
    if cfg.source == "gguf":
        from slmflow.gguf_model import convert_gguf

        ws.log(f"converting {source.uri} to safetensors (once)")
        convert_gguf(Path(source.uri), target)
    elif cfg.source == "azureml_registry":
        from slmflow.inputs import scheme

        scheme("azureml", "model.name_or_path").download_model(cfg, target, ws.log)
    else:
        download_from_hub(cfg, target, ws.log)
    return describe_model(target)


def write_pointer(out: Path, folder: Path, sha256: str) -> None:
    """The whole content of a pointer output: where the model folder is and its content hash."""
    (out / "source.json").write_text(json.dumps({"path": str(folder), "sha256": sha256}))


def adopt_pointer(ref: ArtifactRef, store: Store, log=print) -> ArtifactRef:
    """A pointer output made elsewhere (`ref`), recorded in `store` where its folder is here too.

    A pointer is never uploaded (it names a folder of one machine): where the same folder, with
    the same content, is on this machine, the same pointer is written here, under the same key
    and with the same content hash; otherwise this stops naming the folder.
    """
    from slmflow.artifacts import hash_path

    folder, sha256 = Path(ref.meta["external_model_dir"]), ref.parents[0]
    if not folder.is_dir() or hash_path(folder) != sha256:
        raise ConfigError(
            f"model.name_or_path: the model folder {folder} is not on this machine with the "
            "content the run started from; make it available at that path on every worker, or "
            "name the model by hub id (its copy then travels through cache_remote)")
    source = ArtifactRef(kind="model_source", uri=str(folder), sha256=sha256, key=sha256[:24])
    return store.build(ref.kind, ref.key, [source],
                       lambda out, work: write_pointer(out, folder, sha256) or dict(ref.meta), log=log)


def download_from_hub(cfg: BaseModelConfig, target: Path, log=print) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmflow.secrets import get_secret

    log(f"downloading {cfg.name_or_path} (revision {cfg.revision or 'main'})")
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
              "token": get_secret("HF_TOKEN", block="hf-token")}
    tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.name_or_path, dtype=torch.float32, use_safetensors=True, **kwargs
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    os.sync()


STAGE = Stage(name="base_model", kind="base_model", version=1, inputs=("source",), build=build)


if __name__ == "__main__":
    import sys

    from slmflow.configio import load_config
    from slmflow.inputs import model_source
    from slmflow.preflight import store_for
    from slmflow.stage import run_stage

    config = load_config(sys.argv[1] if len(sys.argv) > 1 else None)
    ref = run_stage(STAGE, config.model, store_for(config), source=model_source(config.model))
    print(ref.model_dump_json(indent=2))
