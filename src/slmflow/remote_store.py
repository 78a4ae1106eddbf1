"""A shared remote mirror of the stage store (`cache_remote`: az://, abfs://, file://, any fsspec URL).

Stages that ran on different machines, or in different working directories, reuse each other's
outputs: before a stage builds `<kind>/<key>` it looks for `REMOTE/<kind>/<key>/`, downloads it
into a temporary sibling of the local folder, and uses it only if its content hashes to what its
manifest records (then renames it into place); after a stage builds, its folder is uploaded, the
manifest last, so a reader never trusts a half-written upload.

With a remote, a stage key names the remote instead of the local folder (`artifacts.stage_key`),
so two working directories that share the remote compute the same keys.

Credentials come from the environment, never the config: for az:// adlfs reads
`AZURE_STORAGE_CONNECTION_STRING`, or `AZURE_STORAGE_ACCOUNT_NAME` with `AZURE_STORAGE_ACCOUNT_KEY`,
`AZURE_STORAGE_SAS_TOKEN` or an Azure identity (`AZURE_STORAGE_ANON=false`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmflow.artifacts import MANIFEST, ArtifactRef, hash_path, replace_dir

REMOTE_SCHEMES = ("az://", "abfs://", "abfss://", "file://", "memory://", "gs://", "s3://")


def check_remote_uri(uri: str, field: str = "cache_remote") -> str:
    """Shape only (no network): an fsspec URL with a scheme and a path."""
    from slmflow.errors import ConfigError

    if "://" not in uri or not uri.split("://", 1)[1].strip("/"):
        raise ConfigError(
            f"{field}: {uri!r} is not a storage URL; write e.g. az://CONTAINER/PREFIX (Azure Blob), "
            "or file:///shared/slmflow-cache for a shared folder"
        )
    return uri.rstrip("/")


def _fs(uri: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(uri)
    return fs, root.rstrip("/")


def _files(fs: Any, prefix: str) -> list[str]:
    try:
        return [p for p in fs.find(prefix) if not p.endswith("/")]
    except FileNotFoundError:
        return []


def pull(remote: str, kind: str, key: str, final: Path, log: Callable[[str], None]) -> ArtifactRef | None:
    """The remote copy of `kind/key`, downloaded into `final` if it verifies; else None."""
    fs, root = _fs(remote)
    prefix = f"{root}/{kind}/{key}"
    if not fs.exists(f"{prefix}/{MANIFEST}"):
        return None
    tmp = final.parent / f".tmp-{key}-remote"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for path in _files(fs, prefix):
            rel = path[len(prefix) + 1:]
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(dest))
        ref = ArtifactRef.model_validate_json((tmp / MANIFEST).read_text())
        if hash_path(tmp) != ref.sha256:
            log(f"{kind}/{key}: the copy in {remote} does not match its manifest; rebuilding")
            return None
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{kind}/{key}: reused from {remote}")
    return ref.model_copy(update={"uri": str(final.resolve()), "cached": True})


def has(remote: str, kind: str, key: str) -> bool:
    fs, root = _fs(remote)
    return fs.exists(f"{root}/{kind}/{key}/{MANIFEST}")


def push(remote: str, kind: str, key: str, folder: Path, log: Callable[[str], None]) -> bool:
    """Upload a verified local stage folder (manifest last). False where it has no own content."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("meta", {}).get("external_model_dir"):
        return False  # a pointer to a folder on this machine: nothing to share
    fs, root = _fs(remote)
    prefix = f"{root}/{kind}/{key}"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    for file in files:
        target = f"{prefix}/{file.relative_to(folder).as_posix()}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), target)
    fs.put_file(str(folder / MANIFEST), f"{prefix}/{MANIFEST}")
    log(f"{kind}/{key}: uploaded to {remote}")
    return True
