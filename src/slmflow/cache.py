"""The stage cache every run of a user shares, and `slmflow cache` (ls, du, verify, prune).

Like the Hugging Face cache, stage outputs live outside any output folder by default:
`cache_dir`, else `$SLMFLOW_CACHE`, else `$XDG_CACHE_HOME/slmflow`, else `~/.cache/slmflow`.
`{output_dir}` in either names the run's output folder (`{output_dir}/cache`: one cache per output
folder, the layout before the shared cache). Stage keys do not name the cache's folder, so a run
in a new output folder reuses every stage whose inputs did not change.

An entry is `CACHE/<kind>/<key>/` (see `store`). Each run records which entries it used, and
which one it published as OUTPUT_DIR/model, in `CACHE/.outputs/<hash of the output folder>.json`:
`ls` says which output folders point at an entry, `prune` what a removal means for them. A
published model is hard links (or copies) of the entry's files, so it stays whole without it.

Run as:
    slmflow cache ls | du | verify [--dry-run] [--dir CACHE]
    slmflow cache prune [--older-than 30d] [--keep-last N] [--max-size 20G] [--all] [--dry-run]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from slmflow.artifacts import MANIFEST, fingerprint_path, read_verified, stable_hash, write_atomic

CACHE_ENV = "SLMFLOW_CACHE"
OUTPUTS = ".outputs"
RESULTS = "prefect-results"  # the Prefect task results persisted beside the entries (tasks/)


def default_cache_dir() -> str:
    """$SLMFLOW_CACHE, else $XDG_CACHE_HOME/slmflow, else ~/.cache/slmflow (unexpanded)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    xdg = os.environ.get("XDG_CACHE_HOME")
    return str(Path(xdg) / "slmflow") if xdg else "~/.cache/slmflow"


def resolve_cache_dir(spec: str | None, output_dir: str | Path) -> Path:
    """The cache folder a run with this `cache_dir` (None: the default) and output folder uses."""
    spec = spec or default_cache_dir()
    return Path(spec.replace("{output_dir}", str(output_dir))).expanduser().resolve()


def cache_dir_of(config: Any) -> Path:
    return resolve_cache_dir(config.cache_dir, config.output_dir)


# ---- which output folders use what -----------------------------------------------------------
def record_use(cache: Path, output_dir: Path, uris: list[str], published: str | None) -> None:
    """Record that the run in `output_dir` used these stage folders and published `published`."""
    cache, output_dir = Path(cache).resolve(), Path(output_dir).resolve()

    def entry(uri: str) -> str | None:
        try:
            rel = Path(uri).resolve().relative_to(cache)
        except ValueError:
            return None
        return rel.as_posix() if len(rel.parts) == 2 else None

    used = sorted({e for e in map(entry, uris) if e})
    record = {"output_dir": str(output_dir), "updated": time.time(), "entries": used,
              "published": entry(published) if published else None}
    try:
        write_atomic(cache / OUTPUTS / f"{stable_hash(str(output_dir))[:16]}.json",
                     json.dumps(record, indent=2))
    except OSError:  # a read-only cache: ls just knows less
        pass


def output_records(cache: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((cache / OUTPUTS).glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


# ---- the entries -------------------------------------------------------------------------------
@dataclass
class Entry:
    """One stage output in the cache."""

    kind: str
    key: str
    folder: Path
    size: int
    created: float  # when it was built (its manifest's mtime)
    used: float  # when a run last used it (its fingerprint's mtime; else `created`)
    outputs: list[str] = field(default_factory=list)  # output folders whose last run used it
    published: list[str] = field(default_factory=list)  # output folders that publish it as model

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.key}"


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return default


def entries(cache: Path) -> list[Entry]:
    """Every stage output in the cache (a folder with a manifest), with who uses it."""
    found = []
    for manifest in sorted(Path(cache).glob(f"*/*/{MANIFEST}")):
        folder = manifest.parent
        kind, key = folder.parent.name, folder.name
        if kind.startswith(".") or kind == RESULTS or key.startswith("."):
            continue
        created = _mtime(manifest, 0.0)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        found.append(Entry(kind, key, folder, size, created, _mtime(fingerprint_path(folder), created)))
    by_name = {e.name: e for e in found}
    for record in output_records(Path(cache)):
        for name in record.get("entries", []):
            if name in by_name:
                by_name[name].outputs.append(record["output_dir"])
        if record.get("published") in by_name:
            by_name[record["published"]].published.append(record["output_dir"])
    return found


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def human_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


_SIZE = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_AGE = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """'20G', '500M', '1.5GB', '0' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-size: {text!r} is no size; write e.g. 20G, 500M or 0")
    return int(float(m.group(1)) * _SIZE[m.group(2).upper()])


def parse_age(text: str) -> float:
    """'30d', '12h', '2w', '0s' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--older-than: {text!r} is no age; write e.g. 30d, 12h, 2w or 0s")
    return float(m.group(1)) * _AGE[m.group(2).lower()]


def ls_lines(cache: Path, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    found = entries(cache)
    if not found:
        return [f"{cache}: no entries"]
    lines = [f"{'ENTRY':<40} {'SIZE':>9} {'AGE':>5} {'USED':>5}  OUTPUT FOLDERS"]
    for e in sorted(found, key=lambda e: (e.kind, -e.used)):
        users = ", ".join(o + (" (model)" if o in e.published else "") for o in sorted(e.outputs)) or "-"
        lines.append(f"{e.name:<40} {human_size(e.size):>9} {human_age(now - e.created):>5} "
                     f"{human_age(now - e.used):>5}  {users}")
    return lines


def du_lines(cache: Path) -> list[str]:
    found = entries(cache)
    kinds: dict[str, list[Entry]] = {}
    for e in found:
        kinds.setdefault(e.kind, []).append(e)
    lines = [f"{human_size(sum(e.size for e in es)):>9}  {kind} ({len(es)})" for kind, es in sorted(kinds.items())]
    return [*lines, f"{human_size(sum(e.size for e in found)):>9}  total ({len(found)} entries) in {cache}"]


# ---- removing entries --------------------------------------------------------------------------
@contextmanager
def _held(entry: Entry) -> Iterator[bool]:
    """The entry's lock, taken without waiting: False (nothing held) when a running stage has it."""
    lock = FileLock(str(entry.folder) + ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _remove(cache: Path, entry: Entry) -> None:
    """Delete an entry (its lock held): moved aside first, so no reader sees half of it."""
    stale = entry.folder.parent / f".stale-{entry.key}-{uuid.uuid4().hex[:8]}"
    fingerprint_path(entry.folder).unlink(missing_ok=True)
    os.replace(entry.folder, stale)
    shutil.rmtree(stale, ignore_errors=True)
    (cache / RESULTS / entry.key).unlink(missing_ok=True)  # the Prefect record of it


def _published_whole(entry: Entry, output_dir: str) -> bool:
    """OUTPUT_DIR/model holds its own copy of every file of the entry (hard links or copies)."""
    model = Path(output_dir) / "model"
    for file in entry.folder.iterdir():
        if file.name == MANIFEST or not file.is_file():
            continue
        there = model / file.name
        if there.is_symlink() or not there.is_file() or there.stat().st_size != file.stat().st_size:
            return False
    return True


def choose(found: list[Entry], older_than: float | None, keep_last: int | None,
           max_size: int | None, everything: bool, now: float) -> list[Entry]:
    """The entries the rules remove: older than, beyond the N last used per stage kind, then the
    least recently used until the rest fits in max_size."""
    if everything:
        return list(found)
    chosen = {e.name for e in found if older_than is not None and now - e.used > older_than}
    if keep_last is not None:
        kinds: dict[str, list[Entry]] = {}
        for e in found:
            kinds.setdefault(e.kind, []).append(e)
        for es in kinds.values():
            chosen |= {e.name for e in sorted(es, key=lambda e: -e.used)[keep_last:]}
    if max_size is not None:
        left = sorted((e for e in found if e.name not in chosen), key=lambda e: e.used)
        total = sum(e.size for e in left)
        for e in left:
            if total <= max_size:
                break
            chosen.add(e.name)
            total -= e.size
    return [e for e in found if e.name in chosen]


def prune(cache: Path, *, older_than: float | None = None, keep_last: int | None = None,
          max_size: int | None = None, everything: bool = False, dry_run: bool = False,
          now: float | None = None) -> list[str]:
    """Remove what the rules choose; never an entry a running stage holds (its lock), never a
    published model's entry unless OUTPUT_DIR/model holds its own copy (and then it says so)."""
    cache, now = Path(cache), time.time() if now is None else now
    lines, freed = [], 0
    for e in choose(entries(cache), older_than, keep_last, max_size, everything, now):
        partial = [o for o in e.published if not _published_whole(e, o)]
        if partial:
            lines.append(f"kept {e.name}: published as {partial[0]}/model, which lacks its own copy "
                         "of its files")
            continue
        with _held(e) as held:
            if not held:
                lines.append(f"kept {e.name}: a running stage holds it (its lock)")
                continue
            if not dry_run:
                _remove(cache, e)
        freed += e.size
        note = "".join(f"; {o}/model keeps its own copy and still loads" for o in e.published)
        lines.append(f"{'would remove' if dry_run else 'removed'} {e.name} ({human_size(e.size)}){note}")
    if everything:
        freed += _sweep_leftovers(cache, dry_run, lines)
    lines.append(f"{'would free' if dry_run else 'freed'} {human_size(freed)} in {cache}")
    return lines


def _leftovers(kind_dir: Path) -> dict[str, list[Path]]:
    """By key, what is beside the entries of one stage kind without being one: locks,
    fingerprints, work folders (an unfinished build's checkpoints), temporary and stale folders."""
    found: dict[str, list[Path]] = {}
    for path in kind_dir.iterdir():
        name = path.name
        if name.endswith(".lock"):
            key = name[: -len(".lock")]
        elif name.endswith(".fingerprint.json"):
            key = name[: -len(".fingerprint.json")]
        elif name.startswith(".work-"):
            key = name[len(".work-"):]
        elif name.startswith((".tmp-", ".stale-")):
            key = name.split("-", 1)[1].rsplit("-", 1)[0]  # .tmp-<key>-<8 hex>
        else:
            continue
        found.setdefault(key, []).append(path)
    return found


def _sweep_leftovers(cache: Path, dry_run: bool, lines: list[str]) -> int:
    """After `prune --all`: remove what entries leave beside them, key by key under the key's lock
    (taken without waiting, so what a running stage holds stays), the lock file last. Unlinking a
    held lock file is safe: a process waiting on it sees the unlinked file once it gets it and
    opens the path again (filelock >= 4)."""
    freed = 0
    for kind_dir in sorted(p for p in Path(cache).iterdir() if p.is_dir()):
        if kind_dir.name.startswith(".") or kind_dir.name == RESULTS:
            continue
        for key, paths in sorted(_leftovers(kind_dir).items()):
            if (kind_dir / key).exists():  # a kept entry keeps its lock and fingerprint
                continue
            lock = kind_dir / f"{key}.lock"
            holder = FileLock(str(lock), timeout=0)
            try:
                holder.acquire()
            except Timeout:
                lines.append(f"kept {kind_dir.name}/{key}'s lock and work folder: a running stage "
                             "holds it")
                continue
            try:
                paths = sorted({*paths, lock})  # acquiring it made it, if it was missing
                size = sum(_size_of(p) for p in paths)
                work = [p.name for p in paths if p.name.startswith(".work-")]
                if not dry_run:
                    for path in sorted(paths, key=lambda p: p == lock):
                        if path.is_dir() and not path.is_symlink():
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            path.unlink(missing_ok=True)
                freed += size
                what = ", ".join(sorted(p.name for p in paths))
                note = " (an unfinished build's checkpoints)" if work else ""
                lines.append(f"{'would remove' if dry_run else 'removed'} leftovers of "
                             f"{kind_dir.name}/{key}: {what}{note}")
            finally:
                holder.release()
    # The kind folders stay, empty: a run may be about to create its lock in one.
    return freed


def _size_of(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def verify(cache: Path, dry_run: bool = False) -> tuple[list[str], int]:
    """Re-hash every entry; remove (unless dry_run) those that no longer match. (lines, bad)."""
    lines, bad = [], 0
    for e in entries(cache):
        with _held(e) as held:
            if not held:
                lines.append(f"skipped {e.name}: a running stage holds it (its lock)")
                continue
            if read_verified(e.folder, verify=True) is not None:
                lines.append(f"ok {e.name}")
                continue
            bad += 1
            if not dry_run:
                _remove(cache, e)
            lines.append(f"{'does not match' if dry_run else 'removed (does not match)'} {e.name}")
    lines.append(f"{bad} of {len(entries(cache)) + (0 if dry_run else bad)} entries did not match")
    return lines, bad
