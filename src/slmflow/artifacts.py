"""References to stage outputs, and content hashes.

A stage output is a folder; an `ArtifactRef` names it (kind, where, content hash, the key it was
written under, the content hashes of its inputs) and carries small facts about it. Stages hand
each other these references, never the models themselves. `read_verified` trusts a folder only
while its content still hashes to what its manifest records.

Re-hashing a folder on every cache hit re-reads gigabytes (base, merged and ONNX models), so a
verified folder gets a fingerprint beside it (`<folder>.fingerprint.json`: each file's size,
mtime_ns, inode and sha256). A file that still matches its record is not read again; a changed one
is, and a deleted or added file changes the folder's hash as before. A file modified within 2 s of
the record is read again anyway (timestamps are coarse: a same-size edit right after could keep
the mtime). `SLMFLOW_VERIFY=1` (`slmflow run --verify`, `slmflow cache verify`) re-reads all.
The limit: an edit that keeps a file's size, inode and mtime (one undone with `touch -d`, or a
tool that restores mtimes) goes unseen until then.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MANIFEST = "slmflow-artifact.json"
FINGERPRINT = ".fingerprint.json"  # suffix of the sidecar file beside a verified folder
VERIFY_ENV = "SLMFLOW_VERIFY"  # "1": always re-hash (slmflow run --verify)
RACY_NS = 2_000_000_000  # a file modified this close before its fingerprint is read again
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
    return hash_folder(path)[0]


def hash_folder(folder: Path, known: dict[str, list] | None = None, racy_after_ns: int = 0
                ) -> tuple[str, dict[str, list]]:
    """`hash_path` of a folder, and each file's [size, mtime_ns, inode, sha256].

    A file whose size, mtime and inode match its record in `known` is not read: its recorded
    hash is used, unless its mtime is after `racy_after_ns` (written so close to when the record
    was made that a later same-size edit could share its mtime, as in git's "racy clean").
    """
    known = known or {}
    h, files = hashlib.sha256(), {}
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = file.relative_to(folder).as_posix()
        st = file.stat()
        stat = [st.st_size, st.st_mtime_ns, st.st_ino]
        record = known.get(rel)
        if record and record[:3] == stat and st.st_mtime_ns < racy_after_ns:
            digest = record[3]
        else:
            digest = hash_file(file)
        files[rel] = [*stat, digest]
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest(), files


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-able object with sorted keys (anything else as its str())."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def content_ref(kind: str, path: Path, memo: Path | None = None) -> ArtifactRef:
    """A reference to a user's input file or folder, keyed by its content.

    With `memo` (a folder: the store's `.inputs`), its files' fingerprints are kept there and
    only files that changed since are read again (a local base model: gigabytes). Only in a store
    that exists already: checking inputs creates no folder (a bad input leaves nothing behind).
    """
    if memo is None or not Path(memo).parent.is_dir():
        digest = hash_path(path)
    else:
        record = Path(memo) / f"{stable_hash(str(Path(path).resolve()))[:24]}{FINGERPRINT}"
        digest = hash_remembered(Path(path), record)
    return ArtifactRef(kind=kind, uri=str(path), sha256=digest, key=digest[:24])


def named_ref(kind: str, uri: str, identity: dict[str, Any]) -> ArtifactRef:
    """A reference to an input known by name only (a hub id, a registry model version)."""
    digest = stable_hash(identity)
    return ArtifactRef(kind=kind, uri=uri, sha256=digest, key=digest[:24])


def fingerprint_path(folder: Path) -> Path:
    return folder.parent / (folder.name + FINGERPRINT)


def write_fingerprint(folder: Path, sha256: str, files: dict[str, list]) -> None:
    """Record `folder`'s files as `hash_folder` found them (they hash to `sha256`)."""
    _write_record(fingerprint_path(folder), sha256, files)


def _write_record(record: Path, sha256: str, files: dict[str, list]) -> None:
    try:
        write_atomic(record, json.dumps({"sha256": sha256, "written_ns": time.time_ns(), "files": files}))
    except OSError:  # a read-only store: the next use hashes again
        pass


def _recorded(record: Path, sha256: str | None, verify: bool | None) -> tuple[dict[str, list], int]:
    """The files a fingerprint records (if it was of `sha256`, where given) and the mtime after
    which a file counts as racy; nothing when verifying."""
    if verify or (verify is None and os.environ.get(VERIFY_ENV, "") not in ("", "0")):
        return {}, 0
    try:
        recorded = json.loads(record.read_text())
        if sha256 is None or recorded["sha256"] == sha256:
            return dict(recorded["files"]), int(recorded["written_ns"]) - RACY_NS
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {}, 0


def hash_remembered(path: Path, record: Path, verify: bool | None = None) -> str:
    """`hash_path(path)`, reading again only files whose fingerprint in `record` changed."""
    known, racy_after = _recorded(record, None, verify)
    if path.is_file():
        st = path.stat()
        stat, old = [st.st_size, st.st_mtime_ns, st.st_ino], known.get("")
        digest = old[3] if old and old[:3] == stat and st.st_mtime_ns < racy_after else hash_file(path)
        files = {"": [*stat, digest]}
    else:
        digest, files = hash_folder(path, known, racy_after)
    if files != known or _had_racy(files, racy_after):
        _write_record(record, digest, files)
    return digest


def _had_racy(files: dict[str, list], racy_after: int) -> bool:
    """A file was read again only for being racy: a new record (written now) makes it clean, or
    it would be read on every use (a build's last file is always racy against its record)."""
    return any(stat[1] >= racy_after for stat in files.values())


def read_verified(folder: Path, verify: bool | None = None) -> ArtifactRef | None:
    """The reference stored in `folder` if its content still hashes to what was recorded.

    Only files whose fingerprint changed are read again (all of them with `verify`, default: the
    SLMFLOW_VERIFY environment variable); see the module docstring.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        ref = ArtifactRef.model_validate_json(manifest.read_text())
    except ValueError:
        return None
    known, racy_after = _recorded(fingerprint_path(folder), ref.sha256, verify)
    digest, files = hash_folder(folder, known, racy_after)
    if digest != ref.sha256:
        fingerprint_path(folder).unlink(missing_ok=True)
        return None
    if files != known or _had_racy(files, racy_after):  # read again: remember it as it is now
        write_fingerprint(folder, digest, files)
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
