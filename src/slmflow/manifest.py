"""The run's deliverable: the exported model in OUTPUT_DIR/model with a reproducibility manifest.

The manifest says what made the model: package versions, the builder options, content hashes of
the data, the base model and every stage output, the full config, the seeds and the git commit of
the slmflow code. The folder is assembled beside its final place and swapped in, so a reader never
sees half of it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from slmflow.artifacts import MANIFEST, ArtifactRef, replace_dir

PACKAGES = ("slmflow", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
            "onnxruntime-genai", "onnxruntime", "onnx", "prefect")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the slmflow checkout this code runs from (None when not a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def build_manifest(config: Any, sources: dict[str, ArtifactRef | None], refs: dict[str, ArtifactRef]) -> dict:
    """Everything needed to reproduce the exported model (no secrets: the config holds none)."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {name: _version(name) for name in PACKAGES} | {"python": sys.version.split()[0]},
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "seeds": {"data": config.data.seed, "finetune": config.finetune.seed},
        "builder_options": refs["export"].meta.get("builder_options"),
        "inputs": {name: {"uri": ref.uri, "sha256": ref.sha256}
                   for name, ref in sources.items() if ref is not None},
        "stages": {name: {"key": ref.key, "sha256": ref.sha256} for name, ref in refs.items()},
        "config": config.model_dump(mode="json"),
    }


def publish_model(exported: ArtifactRef, out_dir: Path, manifest: dict) -> Path:
    """Put the exported model, its manifest and its model card (`slmflow_model.json`: prompt
    template, labels, answer rule, guidance) at OUTPUT_DIR/model (hard links where possible)."""
    final = out_dir / "model"
    tmp = out_dir / f".model.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for src in exported.path.iterdir():
            if src.name == MANIFEST or not src.is_file():
                continue
            try:
                os.link(src, tmp / src.name)
            except OSError:  # another filesystem
                shutil.copy2(src, tmp / src.name)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if "config" in manifest:  # what using the folder needs (slmflow.modelcard)
            from slmflow.modelcard import write_card

            write_card(tmp, manifest["config"], manifest.get("inputs"))
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
