"""The fine-tune's world: processes, nodes and backend, checked before any work; the adapter's
key follows the world size and nothing else about the launch (fast; the real processes are in
e2e/test_distributed.py)."""

from __future__ import annotations

import pytest

from slmflow.config import DistributedConfig, FinetuneConfig, PipelineConfig
from slmflow.distributed import resolve_world
from slmflow.errors import ConfigError

JOB = {"SLMFLOW_DIST_WORLD_SIZE": "4", "SLMFLOW_DIST_MASTER_ADDR": "10.0.0.4",
       "SLMFLOW_DIST_MASTER_PORT": "6105", "SLMFLOW_DIST_NODES": "2",
       "SLMFLOW_DIST_PROCS_PER_NODE": "2"}


def world(device="cpu", env=None, gpus=0, **cfg):
    return resolve_world(DistributedConfig(**cfg), device, env or {}, gpus=lambda: gpus)


def test_auto_is_one_process_on_the_cpu_and_one_per_gpu_on_cuda():
    assert (world().size, world().backend) == (1, "gloo")
    cuda = world("cuda", gpus=4)
    assert (cuda.nodes, cuda.per_node, cuda.backend) == (1, 4, "nccl")
    assert world(processes_per_node=2).size == 2  # 2 CPU processes: gloo


def test_inside_a_job_auto_takes_the_jobs_shape():
    w = world("cuda", JOB, gpus=2)
    assert (w.nodes, w.per_node, w.size, w.backend) == (2, 2, 4, "nccl")
    assert w.job["MASTER_ADDR"] == "10.0.0.4"


@pytest.mark.parametrize(("device", "env", "gpus", "cfg", "message"), [
    ("cuda", None, 2, {"processes_per_node": 4}, (r"processes_per_node=4, but 2 GPU\(s\) are "
     r"visible; use at most 2")),
    ("cpu", None, 0, {"backend": "nccl", "processes_per_node": 2}, (r"backend=nccl needs CUDA.*"
     r"use backend gloo")),
    ("cpu", None, 0, {"nodes": 2}, r"nodes=2: more than one node needs a distributed job.*azureml"),
    ("cuda", JOB, 2, {"nodes": 3}, r"3 node\(s\) × 2 process\(es\) asked, but this job has 2 × 2"),
    ("cpu", JOB, 2, {}, r"inside a distributed job.*leave both auto"),
])
def test_nonsense_is_refused_with_the_fix(device, env, gpus, cfg, message):
    with pytest.raises(ConfigError, match=message):
        world(device, env, gpus, **cfg)


@pytest.mark.parametrize("value", [0, -1])
def test_zero_processes_is_refused_at_the_edge(value):
    from slmflow.configio import build_config

    with pytest.raises(ConfigError, match=r"finetune\.distributed\.processes_per_node.*at least 1"):
        build_config({"finetune": {"distributed": {"processes_per_node": value}}})


def test_the_adapter_key_counts_the_world_size_not_the_launch(monkeypatch, tmp_path):
    from slmflow.artifacts import ArtifactRef
    from slmflow.stages import finetune
    from slmflow.store import Store

    store = Store.at(tmp_path)
    base = ArtifactRef(kind="base_model", uri="/b", sha256="b" * 64, key="b" * 24)
    data = ArtifactRef(kind="dataset", uri="/d", sha256="d" * 64, key="d" * 24)

    def key(**distributed) -> str:
        cfg = FinetuneConfig(device="cpu", distributed=DistributedConfig(**distributed))
        return finetune.STAGE.key(cfg, store, base=base, data=data)

    one = key()
    assert key(timeout_seconds=60, backend="gloo") == one  # how it is launched: same adapter
    assert key(processes_per_node=1) == one
    assert key(processes_per_node=2) != one  # 2 processes: another global batch
    # One process keeps the key adapters had before distributed fine-tuning existed (and before
    # finetune.adapter_path, None for a trained adapter, existed).
    from slmflow.stage import stage_key

    plain = FinetuneConfig(device="cpu").model_dump(mode="json", exclude={"distributed", "adapter_path"})
    assert one == stage_key("adapter", finetune.STAGE.version, plain, [base, data], store)


def test_the_report_field_says_what_the_global_batch_is():
    field = PipelineConfig.model_fields["finetune"].annotation.model_fields["batch_size"]
    assert "global batch is batch_size × gradient_accumulation_steps × world size" in field.description


def test_a_cuda_fine_tune_on_a_machine_without_gpu_stops_before_any_work(tiny_model, tmp_path, capsys):
    import torch

    from slmflow.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["validate", "--set", "model.source=hf", "--set", f"model.name_or_path={tiny_model}",
                 "--set", "finetune.target_modules=[qkv_proj,o_proj]", "--set", "finetune.device=cuda",
                 "--set", f"output_dir={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err == ("error: finetune.device=cuda but no CUDA device is visible; "
                                       "use auto or cpu\n")
    assert not (tmp_path / "out").exists()
