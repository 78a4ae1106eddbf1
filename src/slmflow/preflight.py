"""Check a whole run before any heavy work: files, data, model source, output folder.

Loads no model. Every problem is a ConfigError/DataError with the key, file and line, and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef, resolve_path, source_ref, stable_hash
from slmflow.config import PipelineConfig
from slmflow.dataio import load_examples
from slmflow.errors import ConfigError, DataError


def data_source_ref(spec: str, field: str) -> ArtifactRef:
    """A content reference to a data file (or a `datasets` name, keyed by name)."""
    if spec.startswith("hf:"):
        digest = stable_hash({"dataset": spec})
        return ArtifactRef(kind="data_source", uri=spec, sha256=digest, key=digest[:24])
    try:
        path = resolve_path(spec)
    except FileNotFoundError as exc:
        raise DataError(f"{field}: {exc}") from None
    if not path.is_file():
        raise DataError(f"{field}: {path} does not exist or is not a file; check the path")
    return source_ref("data_source", spec)


def check_output_dir(config: PipelineConfig) -> Path:
    """output_dir (and cache_dir) must be folders we can create and write."""
    for field, value in (("output_dir", config.output_dir), ("cache_dir", config.cache_dir)):
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


def store_dir(config: PipelineConfig) -> Path:
    """Where content-keyed stage outputs live."""
    return Path(config.cache_dir or Path(config.output_dir) / "cache").expanduser().resolve()


def validate_run(config: PipelineConfig) -> dict[str, Any]:
    """Check everything a run needs; return the source refs and a short summary."""
    from slmflow.stages.base_model import model_source_ref

    check_output_dir(config)
    model_src = model_source_ref(config.model)
    train_src = data_source_ref(config.data.train_file, "data.train_file")
    eval_src = data_source_ref(config.data.eval_file, "data.eval_file") if config.data.eval_file else None
    train_rows = load_examples(train_src.uri, config.data)
    eval_rows = load_examples(eval_src.uri, config.data) if eval_src else None
    if eval_rows is None and min(
        sum(r[config.data.label_column] == label for r in train_rows) for label in config.data.labels
    ) < 2:
        missing = [
            label for label in config.data.labels
            if sum(r[config.data.label_column] == label for r in train_rows) < 2
        ]
        raise DataError(
            f"{train_src.uri}: labels {missing} have fewer than 2 rows, so a train/eval split "
            "cannot hold each out; add rows or give data.eval_file"
        )
    return {
        "model_source": model_src,
        "train_source": train_src,
        "eval_source": eval_src,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows) if eval_rows is not None else None,
    }
