"""References to stage outputs, and content hashes.

A stage output is a folder; an `ArtifactRef` names it (kind, where, content hash, the key it was
written under, the content hashes of its inputs) and carries small facts about it. Stages hand
each other these references, never the models themselves. `read_verified` trusts a folder only
while its content still hashes to what its manifest records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MANIFEST = "slmflow-artifact.json"
_CHUNK = 4 * 1024 * 1024


class ArtifactRef(BaseModel):
    """A small, picklable reference to a stage output (never the model itself)."""

    kind: str = Field(description="What the folder holds: base_model, dataset, adapter, ...")
    uri: str = Field(description="Absolute path of the folder (or file).")
    sha256: str = Field(description="Content hash of the folder: every file's path and bytes.")
    key: str = Field(description="Lineage key it was written under.")
    parents: list[str] = Field(default_factory=list, description="Content hashes of its inputs.")
    meta: dict[str, Any] = Field(default_factory=dict, description="Small facts about it.")
    cached: bool = Field(False, description="This call reused an existing output.")

    @property
    def path(self) -> Path:
        return Path(self.uri)


def hash_file(path: Path, digest: Any = None) -> str:
    h = digest or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_path(path: Path) -> str:
    """sha256 over a file's bytes, or over a folder's sorted relative paths and file hashes.

    The manifest file is left out, so the hash is of the content alone.
    """
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = file.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0" + hash_file(file).encode() + b"\n")
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-able object with sorted keys (anything else as its str())."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def content_ref(kind: str, path: Path) -> ArtifactRef:
    """A reference to a user's input file or folder, keyed by its content."""
    digest = hash_path(path)
    return ArtifactRef(kind=kind, uri=str(path), sha256=digest, key=digest[:24])


def named_ref(kind: str, uri: str, identity: dict[str, Any]) -> ArtifactRef:
    """A reference to an input known by name only (a hub id, a registry model version)."""
    digest = stable_hash(identity)
    return ArtifactRef(kind=kind, uri=uri, sha256=digest, key=digest[:24])


def read_verified(folder: Path) -> ArtifactRef | None:
    """The reference stored in `folder` if its content still hashes to what was recorded."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        ref = ArtifactRef.model_validate_json(manifest.read_text())
    except ValueError:
        return None
    if hash_path(folder) != ref.sha256:
        return None
    return ref.model_copy(update={"uri": str(folder.resolve())})


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place; an existing one is moved aside first and deleted
    (a directory rename cannot overwrite a non-empty folder)."""
    if final.exists():
        stale = final.parent / f".stale-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)


def build_folder(out_dir: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """Build a folder in a temporary sibling, then rename it into place (once; reused after).

    For folders outside the stage store (the tiny model, a converted GGUF). An existing complete
    folder is returned as it is; a non-empty incomplete one is an error, never overwritten.
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not complete; remove it or pick another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():  # save_pretrained writes some files 0600
            f.chmod(0o644)
        try:
            os.replace(tmp, out_dir)  # also replaces an empty out_dir
        except OSError:
            if is_complete(out_dir):  # another process finished first
                return out_dir
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def write_atomic(path: Path, text: str) -> None:
    """Write a text file via a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
