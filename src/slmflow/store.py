"""The content-keyed stage store: one folder per stage output, optionally mirrored to a remote.

A stage writes `STORE/<kind>/<key>/`. The folder is built in a temporary sibling and renamed
into place; its manifest records the content hash, and a folder is trusted only while that hash
still matches. One process builds a key at a time; others wait on its lock and reuse the result.

A `Store` is a value (a local folder, and the remote it mirrors, if any), passed to every stage:
a stage's key depends only on its arguments. With a remote (`cache_remote`: az://, abfs://,
file://, any fsspec URL), a stage looks for `REMOTE/<kind>/<key>/` before building, downloads it
and uses it only if it verifies; after a build it uploads the folder, the manifest last, so a
reader never trusts a half-written upload. Keys name the remote when there is one, never the local
folder: runs in any output folder, and a cache moved elsewhere, compute the same keys.

Beside each folder: `<key>.lock` (held while a stage reads or builds it; `slmflow cache prune`
skips what it cannot take) and `<key>.fingerprint.json` (see `artifacts`; its mtime is the
entry's last use).

Credentials come from the environment, never the config: for az:// adlfs reads
`AZURE_STORAGE_CONNECTION_STRING`, or `AZURE_STORAGE_ACCOUNT_NAME` with `AZURE_STORAGE_ACCOUNT_KEY`,
`AZURE_STORAGE_SAS_TOKEN` or an Azure identity (`AZURE_STORAGE_ANON=false`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field

from slmflow.artifacts import (
    MANIFEST,
    ArtifactRef,
    fingerprint_path,
    hash_folder,
    read_verified,
    replace_dir,
    write_fingerprint,
)

Log = Callable[[str], None]
Build = Callable[[Path, Path], dict[str, Any]]
LOCAL = "local"


class Store(BaseModel):
    """Where stage outputs live: a local folder, and the shared remote it mirrors (or None)."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="Absolute path of the local stage store.")
    remote: str | None = Field(None, description="fsspec URL of the shared mirror, or None.")

    @classmethod
    def at(cls, path: str | Path, remote: str | None = None) -> Store:
        return cls(path=str(Path(path).expanduser().resolve()), remote=remote.rstrip("/") if remote else None)

    @property
    def root(self) -> Path:
        return Path(self.path)

    @property
    def location(self) -> str:
        """Where the store is, as a stage key names it: the remote when there is one, else
        `LOCAL` (the same for every local folder, so one cache serves every output folder)."""
        return self.remote or LOCAL

    def folder(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def pull(self, kind: str, key: str, log: Log = print) -> ArtifactRef | None:
        """The verified output `kind`/`key` if this store has it or can download it; else None."""
        final = self.folder(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            ref = read_verified(final)
            if ref is None and self.remote:
                ref = _pull(self.remote, kind, key, final, log)
            if ref is not None:
                _used(final)
            return ref

    def build(self, kind: str, key: str, parents: list[ArtifactRef], build: Build,
              log: Log = print) -> ArtifactRef:
        """The verified output `kind`/`key`: reused if present (here or on the remote), else built.

        `build(tmp_dir, work_dir)` writes the output into `tmp_dir` and returns small metadata;
        `work_dir` is stable across attempts (checkpoints there survive a crash).
        """
        final = self.folder(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            # Builds of this key happen only under this lock, so a temporary folder of it that
            # exists now was left by a killed process: remove it (the work folder is kept).
            for left in [*final.parent.glob(f".tmp-{key}-*"), *final.parent.glob(f".stale-{key}-*")]:
                shutil.rmtree(left, ignore_errors=True)
            ref = read_verified(final)
            if ref is not None:
                if self.remote and not _remote_has(self.remote, kind, key):
                    _push(self.remote, kind, key, final, log)
                _used(final)
                return ref.model_copy(update={"cached": True})
            if self.remote:
                pulled = _pull(self.remote, kind, key, final, log)
                if pulled is not None:
                    return pulled
            if final.exists():
                log(f"{kind}/{key}: stored output is incomplete or changed; rebuilding it")
            ref = _build_into(final, key, parents, kind, build)
            if self.remote:
                _push(self.remote, kind, key, final, log)
            return ref


def _build_into(final: Path, key: str, parents: list[ArtifactRef], kind: str, build: Build) -> ArtifactRef:
    work = final.parent / f".work-{key}"
    work.mkdir(exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = build(tmp, work)
        digest, files = hash_folder(tmp)
        ref = ArtifactRef(kind=kind, uri=str(final), sha256=digest, key=key,
                          parents=[p.sha256 for p in parents], meta=meta or {})
        (tmp / MANIFEST).write_text(ref.model_dump_json(indent=2))
        fingerprint_path(final).unlink(missing_ok=True)
        replace_dir(tmp, final)
        write_fingerprint(final, digest, files)  # a rename keeps sizes, mtimes and inodes
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return ref


def _used(final: Path) -> None:
    """Mark a reused folder as used now (the mtime of its fingerprint: `slmflow cache ls`)."""
    try:
        os.utime(fingerprint_path(final))
    except OSError:
        pass


# ---- the remote mirror ---------------------------------------------------------------------
def _fs(uri: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(uri)
    return fs, root.rstrip("/")


def _files(fs: Any, prefix: str) -> list[str]:
    try:
        return [p for p in fs.find(prefix) if not p.endswith("/")]
    except FileNotFoundError:
        return []


def _pull(remote: str, kind: str, key: str, final: Path, log: Log) -> ArtifactRef | None:
    """The remote copy of `kind/key`, downloaded into `final` if it verifies; else None."""
    fs, root = _fs(remote)
    prefix = f"{root}/{kind}/{key}"
    if not fs.exists(f"{prefix}/{MANIFEST}"):
        return None
    started = time.perf_counter()
    tmp = final.parent / f".tmp-{key}-remote"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for path in _files(fs, prefix):
            dest = tmp / path[len(prefix) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(dest))
        ref = ArtifactRef.model_validate_json((tmp / MANIFEST).read_text())
        digest, files = hash_folder(tmp)
        if digest != ref.sha256:
            log(f"{kind}/{key}: the copy in {remote} does not match its manifest; rebuilding")
            return None
        fingerprint_path(final).unlink(missing_ok=True)
        replace_dir(tmp, final)
        write_fingerprint(final, digest, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{kind}/{key}: reused from {remote} ({_amount(final, started)})")
    return ref.model_copy(update={"uri": str(final.resolve()), "cached": True})


def _remote_has(remote: str, kind: str, key: str) -> bool:
    fs, root = _fs(remote)
    return fs.exists(f"{root}/{kind}/{key}/{MANIFEST}")


def _push(remote: str, kind: str, key: str, folder: Path, log: Log) -> bool:
    """Upload a verified local stage folder (manifest last). False where it has no own content."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("meta", {}).get("external_model_dir"):
        return False  # a pointer to a folder on this machine: nothing to share
    fs, root = _fs(remote)
    prefix = f"{root}/{kind}/{key}"
    started = time.perf_counter()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        target = f"{prefix}/{file.relative_to(folder).as_posix()}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), target)
    fs.put_file(str(folder / MANIFEST), f"{prefix}/{MANIFEST}")
    log(f"{kind}/{key}: uploaded to {remote} ({_amount(folder, started)})")
    return True


def _amount(folder: Path, started: float) -> str:
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return f"{size / 2**20:.1f} MB in {time.perf_counter() - started:.1f} s"
