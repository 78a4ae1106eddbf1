"""What is inside stage folders: where a model's files are, what a model is, the prepared splits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef


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


def read_split(data: ArtifactRef, split: str) -> list[dict[str, Any]]:
    """Rows of a prepared split ('train' or 'eval') of a dataset stage folder."""
    with open(Path(data.uri) / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def iter_split(data: ArtifactRef, split: str) -> Iterator[dict[str, Any]]:
    """`read_split`, one row at a time (a large split is never held whole)."""
    with open(Path(data.uri) / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
