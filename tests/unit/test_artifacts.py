"""Content-keyed stage store: keys follow content, outputs are atomic and verified."""

from __future__ import annotations

import pytest

from slmflow.artifacts import (
    MANIFEST,
    ArtifactRef,
    hash_path,
    read_verified,
    run_stage,
    source_ref,
    stage_key,
)
from slmflow.config import DataConfig, FinetuneConfig


def _ref(sha: str) -> ArtifactRef:
    return ArtifactRef(kind="x", uri="/x", sha256=sha, key=sha[:24])


def test_new_content_same_path_gives_new_key(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"phrase": "a", "tone": "Sad"}\n')
    k1 = stage_key("dataset", 1, DataConfig(), [source_ref("data_source", str(data))], tmp_path)
    k2 = stage_key("dataset", 1, DataConfig(), [source_ref("data_source", str(data))], tmp_path)
    data.write_text('{"phrase": "b", "tone": "Sad"}\n')
    k3 = stage_key("dataset", 1, DataConfig(), [source_ref("data_source", str(data))], tmp_path)
    assert k1 == k2 != k3


def test_key_depends_on_config_version_parents_and_store(tmp_path):
    base = stage_key("adapter", 1, FinetuneConfig(), [_ref("a" * 64)], tmp_path)
    assert base != stage_key("adapter", 1, FinetuneConfig(r=8), [_ref("a" * 64)], tmp_path)
    assert base != stage_key("adapter", 2, FinetuneConfig(), [_ref("a" * 64)], tmp_path)
    assert base != stage_key("adapter", 1, FinetuneConfig(), [_ref("b" * 64)], tmp_path)
    assert base != stage_key("adapter", 1, FinetuneConfig(), [_ref("a" * 64)], tmp_path / "other")


def test_folder_hash_covers_names_and_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.txt").write_text("1")
    h = hash_path(tmp_path / "a")
    (tmp_path / "a" / "f.txt").write_text("2")
    assert hash_path(tmp_path / "a") != h
    (tmp_path / "a" / "f.txt").write_text("1")
    (tmp_path / "a" / "f.txt").rename(tmp_path / "a" / "g.txt")
    assert hash_path(tmp_path / "a") != h


def _writer(calls: list):
    def build(out, work):
        calls.append(out)
        (out / "weights.bin").write_bytes(b"w" * 10)
        return {"n": 1}

    return build


def test_run_stage_builds_once_then_reuses(tmp_path):
    calls: list = []
    first = run_stage("thing", "k1", tmp_path, [], _writer(calls))
    second = run_stage("thing", "k1", tmp_path, [], _writer(calls))
    assert len(calls) == 1 and not first.cached and second.cached
    assert first.sha256 == second.sha256 and (first.path / MANIFEST).is_file()
    assert not [p for p in (tmp_path / "thing").iterdir() if p.name.startswith(".")]


def test_changed_or_missing_output_is_rebuilt(tmp_path):
    calls: list = []
    ref = run_stage("thing", "k1", tmp_path, [], _writer(calls))
    (ref.path / "weights.bin").write_bytes(b"tampered")
    assert read_verified(ref.path) is None
    again = run_stage("thing", "k1", tmp_path, [], _writer(calls))
    assert len(calls) == 2 and not again.cached and (again.path / "weights.bin").read_bytes() == b"w" * 10
    import shutil

    shutil.rmtree(ref.path)
    run_stage("thing", "k1", tmp_path, [], _writer(calls))
    assert len(calls) == 3


def test_failed_build_leaves_nothing_that_counts_as_done(tmp_path):
    def broken(out, work):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_stage("thing", "k1", tmp_path, [], broken)
    assert not (tmp_path / "thing" / "k1").exists()
    assert not [p for p in (tmp_path / "thing").iterdir() if p.name.startswith(".tmp")]
