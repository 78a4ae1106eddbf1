"""Register a published model folder (OUTPUT_DIR/model) as an MLflow model version.

The one way slmflow registers a model: the pipeline with `tracking.log_model` (into the run it
logs) and `python -m slmflow.azureml.register` (into an AzureML workspace, whose model list is
its MLflow registry) both call `register_model_folder`.

Tags say what the version is, byte for byte: `slmflow.file.<name>` is the sha256 of each file of
the registered folder; `slmflow.content_sha256` the sha256 of the lines `<sha256>  <name>`
(sha256sum's format), sorted by name, of every file but manifest.json, whose `created` time
changes each time a run publishes the folder (`cd OUTPUT_DIR/model && sha256sum $(ls | grep -vx
manifest.json) | sha256sum` with LC_ALL=C); beside them the manifest's content hashes of the
export stage, of every other stage and of the inputs. A folder with the content of a version
already registered (a cached rerun) is not registered again: that version is returned.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from slmflow.artifacts import hash_file
from slmflow.errors import ConfigError

ARTIFACT_PATH = "model"
CONTENT_TAG = "slmflow.content_sha256"
STAMPED = "manifest.json"  # rewritten (with its creation time) by every publish


def check_model_folder(model_dir: Path) -> dict[str, Any]:
    """The folder's manifest; a folder that is no published slmflow model is refused."""
    manifest = Path(model_dir) / "manifest.json"
    if not (Path(model_dir) / "genai_config.json").is_file() or not manifest.is_file():
        raise ConfigError(f"{model_dir}: not an exported slmflow model (no genai_config.json and "
                          "manifest.json); give OUTPUT_DIR/model of a finished run")
    return json.loads(manifest.read_text())


def file_hashes(model_dir: Path) -> dict[str, str]:
    """{file name: sha256} of every file of the folder (sub-folders included, '/'-separated)."""
    root = Path(model_dir)
    return {p.relative_to(root).as_posix(): hash_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def content_sha256(files: dict[str, str]) -> str:
    """sha256 of sha256sum's lines for every file but the manifest, sorted by name."""
    lines = "".join(f"{sha}  {name}\n" for name, sha in sorted(files.items()) if name != STAMPED)
    return hashlib.sha256(lines.encode()).hexdigest()


def model_version_tags(model_dir: Path) -> dict[str, str]:
    """The tags of a registered version of `model_dir`: its files' and the manifest's hashes."""
    manifest = check_model_folder(model_dir)
    files = file_hashes(model_dir)
    stages = manifest.get("stages", {})
    config = manifest.get("config", {})
    tags = {
        CONTENT_TAG: content_sha256(files),
        "slmflow.export.sha256": str(stages.get("export", {}).get("sha256", "")),
        "slmflow.precision": str(config.get("export", {}).get("precision", "")),
        "slmflow.base_model": str(config.get("model", {}).get("name_or_path", "")),
    }
    tags |= {f"slmflow.stage.{name}.sha256": str(s.get("sha256", "")) for name, s in stages.items()}
    tags |= {f"slmflow.input.{name}.sha256": str(i.get("sha256", ""))
             for name, i in manifest.get("inputs", {}).items()}
    tags |= {f"slmflow.file.{name}": sha for name, sha in files.items()}
    if manifest.get("git_commit"):
        tags["slmflow.git_commit"] = str(manifest["git_commit"])
    return tags


def find_version(client: Any, name: str, content: str) -> Any | None:
    """The version of `name` with this content (CONTENT_TAG), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    same = [v for v in versions if (v.tags or {}).get(CONTENT_TAG) == content]
    return min(same, key=lambda v: int(v.version)) if same else None


def register_model_folder(client: Any, run_id: str, model_dir: Path, name: str) -> tuple[str, bool]:
    """Log `model_dir` into the run and register it as a version of `name` (created when
    missing); (version, reused): reused when an earlier version has the same content."""
    from mlflow.exceptions import MlflowException

    tags = model_version_tags(model_dir)
    earlier = find_version(client, name, tags[CONTENT_TAG])
    if earlier is not None:
        return str(earlier.version), True
    client.log_artifacts(run_id, str(model_dir), ARTIFACT_PATH)
    try:
        client.create_registered_model(name, description="slmflow: fine-tuned and exported "
                                       "ONNX model (onnxruntime-genai)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, f"runs:/{run_id}/{ARTIFACT_PATH}", run_id=run_id, tags=tags,
        description=f"{tags['slmflow.precision']} ONNX of {tags['slmflow.base_model']}; files "
        f"sha256 {tags['slmflow.content_sha256']}")
    return str(version.version), False
