"""Preflight of merge and export: estimated memory and disk against what the machine has."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from slmflow import resources
from slmflow.artifacts import ArtifactRef
from slmflow.config import ExportConfig, MergeConfig
from slmflow.errors import ResourceError, SlmflowError
from slmflow.resources import (
    available_memory_bytes,
    check_resources,
    estimate_export,
    estimate_merge,
    free_disk_bytes,
)

GIB = 2**30


def test_machine_figures_are_read(tmp_path):
    assert 0 < available_memory_bytes() < 1 << 60
    assert free_disk_bytes(tmp_path / "not" / "yet" / "there") == shutil.disk_usage(tmp_path).free


def test_estimates_scale_with_the_fp32_size():
    params = 1_000_000_000  # 4 GB in fp32
    assert estimate_merge(params) == (10_000_000_000, 4_000_000_000)
    assert estimate_export(params, "int4") == (12_000_000_000, 5_000_000_000)
    assert estimate_export(params, "fp32") == (12_000_000_000, 8_000_000_000)
    disks = [estimate_export(params, p)[1] for p in ("int4", "int8", "fp16", "fp32")]
    assert disks == sorted(disks)


def _machine(monkeypatch, mem: int, disk: int) -> None:
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: mem)
    monkeypatch.setattr(resources, "free_disk_bytes", lambda path: disk)
    monkeypatch.delenv(resources.SKIP_ENV, raising=False)


def test_enough_passes(monkeypatch, tmp_path):
    _machine(monkeypatch, mem=16 * GIB, disk=100 * GIB)
    check_resources("merge", *estimate_merge(1_000_000_000), tmp_path)  # 10 GB of memory, 4 GB of disk
    check_resources("export", *estimate_export(135_000_000, "int4"), tmp_path)


def test_too_little_memory(monkeypatch, tmp_path):
    _machine(monkeypatch, mem=2 * GIB, disk=100 * GIB)
    with pytest.raises(ResourceError, match=re.escape(
        "merge: needs about 9.3 GiB of memory, 2.0 GiB available; free memory (stop other jobs) or "
        "fine-tune a smaller model (or set SLMFLOW_SKIP_RESOURCE_CHECK=1 to try anyway)"
    )):
        check_resources("merge", *estimate_merge(1_000_000_000), tmp_path)


def test_too_little_disk(monkeypatch, tmp_path):
    _machine(monkeypatch, mem=64 * GIB, disk=GIB)
    with pytest.raises(ResourceError, match=re.escape(
        f"export: needs about 4.7 GiB of disk, 1.0 GiB free at {tmp_path}; free disk there or set "
        "cache_dir to a folder with more room; or export a smaller model (export.precision int4) "
        "(or set SLMFLOW_SKIP_RESOURCE_CHECK=1 to try anyway)"
    )):
        check_resources("export", *estimate_export(1_000_000_000, "int4"), tmp_path)


def test_both_short_are_named_in_one_message(monkeypatch, tmp_path):
    _machine(monkeypatch, mem=100 * 2**20, disk=10 * 2**20)
    with pytest.raises(ResourceError, match=r"^merge: needs about 1\.2 GiB of memory, 100 MiB available "
                       r"and about 0\.5 GiB of disk, 10 MiB free at .*; free memory .*; free disk there"):
        check_resources("merge", *estimate_merge(134_000_000), tmp_path)


def test_skip_switch(monkeypatch, tmp_path):
    _machine(monkeypatch, mem=1, disk=1)
    monkeypatch.setenv(resources.SKIP_ENV, "1")
    check_resources("merge", *estimate_merge(10**9), tmp_path)


def test_resource_error_is_a_user_error_never_retried():
    assert issubclass(ResourceError, SlmflowError)
    assert ResourceError.exit_code == 2 and ResourceError.retryable is False


# ---- the stages stop before loading anything ------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    import subprocess

    import transformers

    from slmflow import lifeline

    def loaded(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", loaded)
    monkeypatch.setattr(subprocess, "run", loaded)
    monkeypatch.setattr(lifeline, "run", loaded)  # the model builder


def _ref(kind: str, uri: Path, **meta) -> ArtifactRef:
    return ArtifactRef(kind=kind, uri=str(uri), sha256=kind[0] * 64, key=kind[:4], meta=meta)


def test_merge_stops_before_loading_when_memory_is_short(monkeypatch, tmp_path, tiny_model, no_loading):
    from slmflow.stage import run_stage
    from slmflow.stages.merge import STAGE
    from slmflow.store import Store

    _machine(monkeypatch, mem=GIB, disk=100 * GIB)
    base = _ref("base_model", tmp_path / "b", external_model_dir=str(tiny_model), parameters=3_000_000_000)
    store = tmp_path / "store"
    with pytest.raises(ResourceError, match=r"^merge: needs about 27\.9 GiB of memory, 1\.0 GiB available"):
        run_stage(STAGE, MergeConfig(), Store.at(store), base=base, adapter=_ref("adapter", tmp_path / "a"),
                  data=_ref("dataset", tmp_path / "d"))
    left = sorted(p.name for p in (store / "merged_model").iterdir())
    assert not [n for n in left if not n.endswith(".lock") and not n.startswith(".work-")], left


def test_export_stops_before_the_builder_when_disk_is_short(monkeypatch, tmp_path, tiny_model, no_loading):
    from slmflow.folders import describe_model
    from slmflow.stage import run_stage
    from slmflow.stages.export import STAGE
    from slmflow.store import Store

    params = describe_model(tiny_model)["parameters"]
    _, need_disk = estimate_export(params, "fp32")
    _machine(monkeypatch, mem=64 * GIB, disk=need_disk - 1)
    merged = _ref("merged_model", tmp_path / "m", external_model_dir=str(tiny_model))
    with pytest.raises(ResourceError, match=r"^export: needs about \d+ MiB of disk, \d+ MiB free at .*"
                       r"onnx_model/\.tmp-.*; free disk there or set cache_dir .*export\.precision int4"):
        run_stage(STAGE, ExportConfig(precision="fp32"), Store.at(tmp_path / "store"), merged=merged,
                  data=_ref("dataset", tmp_path / "d"))
    left = sorted(p.name for p in (tmp_path / "store" / "onnx_model").iterdir())
    assert not [n for n in left if not n.endswith(".lock") and not n.startswith(".work-")], left


def test_a_run_too_big_for_this_machine_stops_before_fine_tuning(monkeypatch, tmp_path, tiny_model, capsys):
    from slmflow.cli import main

    _machine(monkeypatch, mem=2**20, disk=100 * GIB)
    args = ["validate", "--set", "model.source=hf", "--set", f"model.name_or_path={tiny_model}",
            "--set", "finetune.target_modules=[qkv_proj,o_proj]", "--set", f"output_dir={tmp_path / 'out'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: merge and export \(checked before fine-tuning\): needs about \d+ MiB of "
                        r"memory, 1 MiB available; free memory .*\n", err), err
    assert not (tmp_path / "out").exists()
