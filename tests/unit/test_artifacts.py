"""Content-keyed stage store: keys follow content, outputs are atomic and verified."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmflow.artifacts import MANIFEST, ArtifactRef, content_ref, hash_path, read_verified
from slmflow.config import DataConfig, FinetuneConfig
from slmflow.stage import stage_key
from slmflow.store import Store


def _ref(sha: str) -> ArtifactRef:
    return ArtifactRef(kind="x", uri="/x", sha256=sha, key=sha[:24])


def test_new_content_same_path_gives_new_key(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"phrase": "a", "tone": "Sad"}\n')
    k1 = stage_key("dataset", 1, DataConfig(), [content_ref("data_source", data)], Store.at(tmp_path))
    k2 = stage_key("dataset", 1, DataConfig(), [content_ref("data_source", data)], Store.at(tmp_path))
    data.write_text('{"phrase": "b", "tone": "Sad"}\n')
    k3 = stage_key("dataset", 1, DataConfig(), [content_ref("data_source", data)], Store.at(tmp_path))
    assert k1 == k2 != k3


def test_key_depends_on_config_version_parents_and_remote_not_the_local_folder(tmp_path):
    store = Store.at(tmp_path)
    base = stage_key("adapter", 1, FinetuneConfig(), [_ref("a" * 64)], store)
    assert base != stage_key("adapter", 1, FinetuneConfig(r=8), [_ref("a" * 64)], store)
    assert base != stage_key("adapter", 2, FinetuneConfig(), [_ref("a" * 64)], store)
    assert base != stage_key("adapter", 1, FinetuneConfig(), [_ref("b" * 64)], store)
    assert base != stage_key("adapter", 1, FinetuneConfig(), [_ref("a" * 64)],
                             Store.at(tmp_path, "az://container/prefix"))
    # one shared cache serves every output folder: where it lives is no part of the key
    assert base == stage_key("adapter", 1, FinetuneConfig(), [_ref("a" * 64)], Store.at(tmp_path / "other"))


def test_key_with_a_remote_is_the_same_as_before_the_shared_cache(tmp_path):
    """Keys of stores with a remote stay what they were (b011635's stage_key); local keys changed
    once, when the local folder left the key (issue 22)."""
    import hashlib
    import json

    def old_key(stage, version, config, parents, store, remote=None):  # b011635's stage_key
        cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
        blob = json.dumps({"stage": stage, "version": version, "config": cfg,
                           "parents": [p.sha256 for p in parents],
                           "store": remote or str(store.resolve())},
                          sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    nested = {"data": DataConfig(), "loss_on": "answer"}  # a config slice holding a model
    for config in (FinetuneConfig(), nested):
        remote = Store.at(tmp_path, "az://container/prefix/")
        assert stage_key("x", 2, config, [], remote) == old_key(
            "x", 2, config, [], tmp_path, "az://container/prefix")
        assert stage_key("x", 2, config, [_ref("a" * 64)], Store.at(tmp_path)) == old_key(
            "x", 2, config, [_ref("a" * 64)], Path("local"), "local")


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
    first = Store.at(tmp_path).build("thing", "k1", [], _writer(calls))
    second = Store.at(tmp_path).build("thing", "k1", [], _writer(calls))
    assert len(calls) == 1 and not first.cached and second.cached
    assert first.sha256 == second.sha256 and (first.path / MANIFEST).is_file()
    assert not [p for p in (tmp_path / "thing").iterdir() if p.name.startswith(".")]


def test_changed_or_missing_output_is_rebuilt(tmp_path):
    calls: list = []
    ref = Store.at(tmp_path).build("thing", "k1", [], _writer(calls))
    (ref.path / "weights.bin").write_bytes(b"tampered")
    assert read_verified(ref.path) is None
    again = Store.at(tmp_path).build("thing", "k1", [], _writer(calls))
    assert len(calls) == 2 and not again.cached and (again.path / "weights.bin").read_bytes() == b"w" * 10
    import shutil

    shutil.rmtree(ref.path)
    Store.at(tmp_path).build("thing", "k1", [], _writer(calls))
    assert len(calls) == 3


def test_failed_build_leaves_nothing_that_counts_as_done(tmp_path):
    def broken(out, work):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        Store.at(tmp_path).build("thing", "k1", [], broken)
    assert not (tmp_path / "thing" / "k1").exists()
    assert not [p for p in (tmp_path / "thing").iterdir() if p.name.startswith(".tmp")]
