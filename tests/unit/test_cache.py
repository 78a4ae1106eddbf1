"""The shared stage cache: where it is, fingerprints instead of re-hashing, `slmflow cache`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmflow import artifacts, cache
from slmflow.artifacts import fingerprint_path, read_verified
from slmflow.cli import main
from slmflow.config import PipelineConfig
from slmflow.store import Store

DAY = 86400.0


def _build(store: Store, kind: str, key: str, size: int = 10, files: int = 1):
    def build(out: Path, work: Path) -> dict:
        for i in range(files):
            (out / f"w{i}.bin").write_bytes(b"w" * size)
        return {}

    return store.build(kind, key, [], build, log=lambda m: None)


def _age(folder: Path, seconds: float) -> None:
    """Make the folder's files `seconds` old (so none is racy), as a run long ago left them."""
    then = time.time() - seconds
    for p in folder.rglob("*"):
        os.utime(p, (then, then))


def _used(folder: Path, when: float) -> None:
    os.utime(fingerprint_path(folder), (when, when))


@pytest.fixture
def hashed(monkeypatch):
    """The files read by hash_file, in order."""
    calls: list[str] = []
    real = artifacts.hash_file

    def counting(path, digest=None):
        calls.append(Path(path).name)
        return real(path, digest)

    monkeypatch.setattr(artifacts, "hash_file", counting)
    return calls


# ---- where the cache is --------------------------------------------------------------------------
def test_default_cache_is_outside_the_output_folder_and_overridable(monkeypatch, tmp_path):
    monkeypatch.delenv("SLMFLOW_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.resolve_cache_dir(None, "runs/a") == Path("~/.cache/slmflow").expanduser().resolve()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.resolve_cache_dir(None, "runs/a") == tmp_path / "xdg" / "slmflow"
    monkeypatch.setenv("SLMFLOW_CACHE", str(tmp_path / "mine"))
    assert cache.resolve_cache_dir(None, "runs/a") == tmp_path / "mine"
    assert cache.resolve_cache_dir(str(tmp_path / "cfg"), "runs/a") == tmp_path / "cfg"  # config wins
    # today's layout, one cache per output folder, on request
    assert cache.resolve_cache_dir("{output_dir}/cache", tmp_path / "a") == tmp_path / "a" / "cache"


def test_two_output_folders_compute_the_same_keys_in_one_cache(monkeypatch, tmp_path):
    from slmflow.preflight import store_for
    from slmflow.stages import STAGES

    monkeypatch.setenv("SLMFLOW_CACHE", str(tmp_path / "shared"))
    a = PipelineConfig(output_dir=str(tmp_path / "a"))
    b = PipelineConfig(output_dir=str(tmp_path / "b"))
    assert store_for(a) == store_for(b) and store_for(a).root == tmp_path / "shared"
    stage = STAGES["finetune"]
    ref = artifacts.ArtifactRef(kind="x", uri="/x", sha256="a" * 64, key="a" * 24)
    assert stage.key(a.finetune, store_for(a), base=ref, data=ref) == stage.key(
        b.finetune, store_for(b), base=ref, data=ref)
    # an explicit per-output cache still keys the same (the folder is no part of the key)
    c = PipelineConfig(output_dir=str(tmp_path / "c"), cache_dir="{output_dir}/cache")
    assert store_for(c).root == tmp_path / "c" / "cache"


# ---- fingerprints ---------------------------------------------------------------------------------
def test_cached_reuse_reads_no_file_while_the_fingerprint_matches(tmp_path, hashed):
    store = Store.at(tmp_path)
    ref = _build(store, "onnx_model", "k1", files=3)
    _age(ref.path, 60)  # a later run: nothing is racy any more
    assert read_verified(ref.path) is not None  # the mtimes changed: read once, re-recorded
    hashed.clear()
    again = _build(store, "onnx_model", "k1", files=3)
    assert again.cached and again.sha256 == ref.sha256
    assert read_verified(ref.path) is not None
    assert hashed == []  # not one byte re-read
    assert read_verified(ref.path, verify=True) is not None  # --verify reads everything
    assert sorted(hashed) == ["w0.bin", "w1.bin", "w2.bin"]


def test_a_file_racy_against_its_build_is_read_once_then_trusted(tmp_path, hashed, monkeypatch):
    """A build's files are written just before its fingerprint, so they are racy against it: the
    first reuse (more than 2 s later) reads them and records them anew; later ones read nothing.
    (Before, the record stayed and the model was re-read on every cached run.)"""
    from types import SimpleNamespace

    store = Store.at(tmp_path)
    ref = _build(store, "merged_model", "k1", files=2)
    later = time.time_ns() + 3_000_000_000  # the first reuse, 3 s after the build
    monkeypatch.setattr(artifacts, "time", SimpleNamespace(time_ns=lambda: later))
    hashed.clear()
    assert read_verified(ref.path) is not None
    assert sorted(hashed) == ["w0.bin", "w1.bin"]  # racy: read again
    hashed.clear()
    assert read_verified(ref.path) is not None
    assert hashed == []


def test_only_the_changed_file_is_read_again_and_an_edit_is_caught(tmp_path, hashed):
    store = Store.at(tmp_path)
    ref = _build(store, "onnx_model", "k1", files=3)
    _age(ref.path, 60)
    read_verified(ref.path)
    hashed.clear()
    (ref.path / "w1.bin").write_bytes(b"x" * 10)  # same size, new mtime
    assert read_verified(ref.path) is None
    assert hashed == ["w1.bin"]


def test_a_same_size_edit_right_after_the_build_is_caught(tmp_path):
    """Coarse timestamps: an edit in the same clock tick as the build keeps size, inode and maybe
    the mtime; files that new are read again (racy clean), so it is caught."""
    ref = _build(Store.at(tmp_path), "onnx_model", "k1")
    stat = (ref.path / "w0.bin").stat()
    with open(ref.path / "w0.bin", "r+b") as f:
        f.write(b"x")
    os.utime(ref.path / "w0.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even the same mtime
    assert read_verified(ref.path) is None


def test_deleted_and_added_files_are_caught(tmp_path):
    store = Store.at(tmp_path)
    ref = _build(store, "onnx_model", "k1", files=2)
    _age(ref.path, 60)
    read_verified(ref.path)
    (ref.path / "w1.bin").unlink()
    assert read_verified(ref.path) is None
    ref = _build(store, "onnx_model", "k2", files=2)
    _age(ref.path, 60)
    read_verified(ref.path)
    (ref.path / "extra.bin").write_bytes(b"e")
    assert read_verified(ref.path) is None


def test_a_changed_manifest_hash_is_not_trusted(tmp_path):
    ref = _build(Store.at(tmp_path), "onnx_model", "k1")
    _age(ref.path, 60)
    read_verified(ref.path)
    manifest = ref.path / artifacts.MANIFEST
    manifest.write_text(manifest.read_text().replace(ref.sha256, "0" * 64))
    assert read_verified(ref.path) is None


# ---- ls, du ---------------------------------------------------------------------------------------
def test_ls_and_du_show_entries_sizes_and_the_output_folders_using_them(tmp_path):
    root = tmp_path / "cache"
    store = Store.at(root)
    model = _build(store, "onnx_model", "k1", size=2048)
    data = _build(store, "dataset", "d1", size=100)
    cache.record_use(root, tmp_path / "runs" / "a", [model.uri, data.uri], model.uri)
    cache.record_use(root, tmp_path / "runs" / "b", [data.uri], None)
    lines = cache.ls_lines(root)
    assert lines[0].split()[:4] == ["ENTRY", "SIZE", "AGE", "USED"]
    row = next(line for line in lines if line.startswith("onnx_model/k1"))
    size = {e.name: e.size for e in cache.entries(root)}  # its files, the manifest among them
    assert cache.human_size(size["onnx_model/k1"]) in row and f"{tmp_path / 'runs' / 'a'} (model)" in row
    row = next(line for line in lines if line.startswith("dataset/d1"))
    assert str(tmp_path / "runs" / "a") in row and str(tmp_path / "runs" / "b") in row
    du = cache.du_lines(root)
    assert du[0].split() == [*cache.human_size(size["dataset/d1"]).split(), "dataset", "(1)"]
    assert du[-1].split()[:4] == [*cache.human_size(sum(size.values())).split(), "total", "(2"]


def test_cache_cli_ls_du_and_prune_needs_a_rule(tmp_path, capsys):
    root = tmp_path / "cache"
    _build(Store.at(root), "dataset", "d1")
    assert main(["cache", "ls", "--dir", str(root)]) == 0
    assert "dataset/d1" in capsys.readouterr().out
    assert main(["cache", "du", "--dir", str(root)]) == 0
    assert "total (1 entries)" in capsys.readouterr().out
    assert main(["cache", "prune", "--dir", str(root)]) == 2
    assert "--older-than AGE, --keep-last N, --max-size SIZE or --all" in capsys.readouterr().err
    assert main(["cache", "prune", "--dir", str(root), "--max-size", "lots"]) == 2
    assert "--max-size: 'lots' is no size" in capsys.readouterr().err


# ---- prune ----------------------------------------------------------------------------------------
def _cache_of_ages(root: Path, now: float) -> int:
    """dataset d1..d3 and adapter a1, a2, last used 1..3 and 10, 20 days ago; of one size each
    (returned: 100 B and the manifest)."""
    store = Store.at(root)
    for kind, key, days in (("dataset", "d1", 1), ("dataset", "d2", 2), ("dataset", "d3", 3),
                            ("adapter", "a1", 10), ("adapter", "a2", 20)):
        _used(_build(store, kind, key, size=100).path, now - days * DAY)
    sizes = {e.size for e in cache.entries(root)}
    assert len(sizes) == 1
    return sizes.pop()


def _left(root: Path) -> list[str]:
    return sorted(e.name for e in cache.entries(root))


def test_prune_older_than(tmp_path):
    now = time.time()
    size = _cache_of_ages(tmp_path, now)
    lines = cache.prune(tmp_path, older_than=5 * DAY, now=now)
    assert _left(tmp_path) == ["dataset/d1", "dataset/d2", "dataset/d3"]
    assert f"removed adapter/a1 ({cache.human_size(size)})" in lines
    assert lines[-1] == f"freed {cache.human_size(2 * size)} in {tmp_path}"


def test_prune_keep_last_per_stage(tmp_path):
    now = time.time()
    _cache_of_ages(tmp_path, now)
    cache.prune(tmp_path, keep_last=1, now=now)
    assert _left(tmp_path) == ["adapter/a1", "dataset/d1"]


def test_prune_max_size_removes_the_least_recently_used_first(tmp_path):
    now = time.time()
    size = _cache_of_ages(tmp_path, now)
    cache.prune(tmp_path, max_size=2 * size + size // 2, now=now)
    assert _left(tmp_path) == ["dataset/d1", "dataset/d2"]
    cache.prune(tmp_path, max_size=0, now=now)
    assert _left(tmp_path) == []


def test_prune_dry_run_removes_nothing(tmp_path):
    now = time.time()
    size = _cache_of_ages(tmp_path, now)
    lines = cache.prune(tmp_path, everything=True, dry_run=True, now=now)
    assert len(_left(tmp_path)) == 5
    assert f"would remove dataset/d3 ({cache.human_size(size)})" in lines
    assert lines[-1] == f"would free {cache.human_size(5 * size)} in {tmp_path}"


def test_prune_keeps_an_entry_whose_lock_another_process_holds(tmp_path):
    store = Store.at(tmp_path)
    held, free = _build(store, "adapter", "held").path, _build(store, "adapter", "free").path
    script = ("import sys; from filelock import FileLock\n"
              f"with FileLock({str(held) + '.lock'!r}):\n print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lines = cache.prune(tmp_path, everything=True)
        assert "kept adapter/held: a running stage holds it (its lock)" in lines
        assert read_verified(held) is not None and not free.exists()
        lines, bad = cache.verify(tmp_path)
        assert "skipped adapter/held: a running stage holds it (its lock)" in lines and bad == 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    cache.prune(tmp_path, everything=True)  # released: now it goes
    assert not held.exists()


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def test_prune_all_leaves_no_locks_work_or_temporary_folders(tmp_path):
    store = Store.at(tmp_path)
    _build(store, "adapter", "done")
    _build(store, "dataset", "d1")
    # What a killed build leaves: its lock, its work folder (checkpoints), a temporary folder.
    (tmp_path / "adapter" / ".work-killed" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "adapter" / ".work-killed" / "checkpoint-4" / "model.bin").write_bytes(b"c" * 7)
    (tmp_path / "adapter" / ".tmp-killed-0123abcd").mkdir()
    (tmp_path / "adapter" / "killed.lock").touch()
    (tmp_path / "dataset" / ".stale-d1-89abcdef").mkdir()
    lines = cache.prune(tmp_path, everything=True, dry_run=True)
    assert ("would remove leftovers of adapter/killed: .tmp-killed-0123abcd, .work-killed, "
            "killed.lock (an unfinished build's checkpoints)") in lines
    assert (tmp_path / "adapter" / ".work-killed").is_dir()  # a dry run removes nothing
    lines = cache.prune(tmp_path, everything=True)
    assert "removed leftovers of adapter/done: done.lock" in lines
    assert _files_under(tmp_path / "adapter") == [] and _files_under(tmp_path / "dataset") == []
    assert not list((tmp_path / "adapter").iterdir()) and not list((tmp_path / "dataset").iterdir())


def test_prune_all_keeps_what_a_running_build_holds(tmp_path):
    # Another process holds the lock of a build in progress (work folder, no entry yet): its lock
    # and work folder stay; the unheld key's leftovers go.
    store = Store.at(tmp_path)
    _build(store, "adapter", "other")
    work = tmp_path / "adapter" / ".work-building"
    work.mkdir()
    (work / "checkpoint.bin").write_bytes(b"c")
    lock = tmp_path / "adapter" / "building.lock"
    script = ("import sys; from filelock import FileLock\n"
              f"with FileLock({str(lock)!r}):\n print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lines = cache.prune(tmp_path, everything=True)
        assert "kept adapter/building's lock and work folder: a running stage holds it" in lines
        assert _files_under(tmp_path / "adapter") == [".work-building/checkpoint.bin", "building.lock"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    cache.prune(tmp_path, everything=True)
    assert _files_under(tmp_path / "adapter") == []


def test_prune_of_a_published_entry_says_so_and_keeps_a_partial_copy(tmp_path):
    from slmflow.manifest import publish_model

    root = tmp_path / "cache"
    store = Store.at(root)
    whole = _build(store, "onnx_model", "whole", files=2)
    partial = _build(store, "onnx_model", "partial", files=2)
    for out, ref in (("a", whole), ("b", partial)):
        publish_model(ref, tmp_path / out, {})
        cache.record_use(root, tmp_path / out, [ref.uri], ref.uri)
    (tmp_path / "b" / "model" / "w1.bin").unlink()  # b/model would not load without the cache
    lines = cache.prune(root, everything=True)
    assert f"kept onnx_model/partial: published as {tmp_path / 'b'}/model, which lacks its own copy of its files" in lines
    assert any(line.startswith("removed onnx_model/whole (") and line.endswith(
        f"); {tmp_path / 'a'}/model keeps its own copy and still loads") for line in lines), lines
    assert _left(root) == ["onnx_model/partial"]
    assert (tmp_path / "a" / "model" / "w0.bin").read_bytes() == b"w" * 10  # the hard link survives


def test_verify_removes_what_does_not_match(tmp_path):
    store = Store.at(tmp_path)
    good, bad = _build(store, "dataset", "good").path, _build(store, "dataset", "bad").path
    _age(good, 60)
    _age(bad, 60)
    read_verified(bad)
    stat = (bad / "w0.bin").stat()
    (bad / "w0.bin").write_bytes(b"x" * 10)
    os.utime(bad / "w0.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # unseen by the fingerprint
    assert read_verified(bad) is not None  # the documented limit
    lines, n = cache.verify(tmp_path, dry_run=True)
    assert n == 1 and "does not match dataset/bad" in lines and bad.exists()
    lines, n = cache.verify(tmp_path)
    assert n == 1 and "removed (does not match) dataset/bad" in lines and "ok dataset/good" in lines
    assert _left(tmp_path) == ["dataset/good"]


def test_input_files_are_read_again_only_when_they_changed(tmp_path, hashed):
    from slmflow.artifacts import content_ref

    model, data, memo = tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "store" / ".inputs"
    data.write_text("x")
    content_ref("data_source", data, memo)
    assert not memo.parent.exists()  # no store yet: checking inputs creates none
    memo.parent.mkdir()
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"w" * 100)
    data.write_text('{"phrase": "a", "tone": "Sad"}\n')
    for p in (model / "weights.safetensors", data):
        os.utime(p, (time.time() - 60, time.time() - 60))
    first = [content_ref("model_source", model, memo), content_ref("data_source", data, memo)]
    assert [r.sha256 for r in first] == [artifacts.hash_path(model), artifacts.hash_path(data)]
    hashed.clear()
    assert [content_ref("model_source", model, memo).sha256,
            content_ref("data_source", data, memo).sha256] == [r.sha256 for r in first]
    assert hashed == []
    data.write_text('{"phrase": "b", "tone": "Sad"}\n')  # same size: caught (mtime, racy)
    assert content_ref("data_source", data, memo).sha256 == artifacts.hash_path(data) != first[1].sha256


def test_run_verify_turns_re_hashing_on_before_the_inputs_are_checked(monkeypatch, tmp_path, capsys):
    from slmflow import preflight
    from slmflow.errors import ConfigError

    seen = []

    def validate_run(config):
        seen.append(os.environ.get(artifacts.VERIFY_ENV))
        raise ConfigError("stop here")

    monkeypatch.setattr(preflight, "validate_run", validate_run)
    monkeypatch.setenv(artifacts.VERIFY_ENV, "0")  # restored afterwards, whatever main sets
    assert main(["run", "--no-prefect", "--set", f"output_dir={tmp_path}"]) == 2
    assert main(["run", "--no-prefect", "--verify", "--set", f"output_dir={tmp_path}"]) == 2
    assert seen == ["0", "1"] and "stop here" in capsys.readouterr().err
