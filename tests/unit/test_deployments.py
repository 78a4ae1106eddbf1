"""Deployments, flow parameters and the local stack script, without a server."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from slmflow.config import PipelineConfig
from slmflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def deploy():
    return _load(REPO / "deployments" / "deploy.py", "slmflow_deploy")


def test_every_deployment_starts_from_a_valid_config(deploy):
    from slmflow.configio import load_config

    assert {d.name for d in deploy.DEPLOYMENTS} == {"local-cpu", "local-gpu", "azureml",
                                                     "azureml-split"}
    for spec in deploy.DEPLOYMENTS:
        params = deploy.default_parameters(spec)
        assert params["config"] == load_config(REPO / spec.config).model_dump(mode="json")
        assert not Path(spec.config).is_absolute()


def test_gpu_deployments_ask_for_qlora_on_cuda(deploy):
    by_name = {d.name: deploy.default_parameters(d)["config"] for d in deploy.DEPLOYMENTS}
    for name in ("local-gpu", "azureml"):
        assert by_name[name]["finetune"]["method"] == "qlora"
        assert by_name[name]["finetune"]["device"] == "cuda"
        assert by_name[name]["export"]["execution_provider"] == "cuda"
    assert by_name["local-cpu"]["export"]["execution_provider"] == "cpu"


def test_built_deployment_stores_no_path_of_this_machine(deploy):
    spec = next(d for d in deploy.DEPLOYMENTS if d.name == "local-cpu")
    built = deploy.build_deployment(spec)
    assert built.entrypoint == "flows.pipeline.slmflow_pipeline"
    assert built.storage is None
    dumped = json.dumps(built.model_dump(mode="json", exclude={"parameter_openapi_schema"}))
    assert str(REPO) not in dumped
    [schedule] = built.schedules
    assert schedule.active is False and schedule.schedule.cron == deploy.NIGHTLY
    assert deploy.build_deployment(spec, schedules_active=True).schedules[0].active is True


def test_list_needs_no_server(deploy, capsys):
    assert deploy.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "slmflow-pipeline/local-cpu\tpool=local-cpu\tconfig=configs/smollm2-135m_lora_cpu.yaml" in out


def test_bad_deploy_arguments_exit_2_naming_the_fix(deploy, capsys, tmp_path):
    assert deploy.main(["--only", "local-tpu", "--list"]) == 2
    assert ("--only local-tpu: no such deployment; choose from azureml, azureml-split, local-cpu, "
            "local-gpu") in capsys.readouterr().err
    assert deploy.main(["--config", "local-cpu", "--list"]) == 2
    assert "expected NAME=FILE" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  lora_r: 8\n")
    assert deploy.main(["--only", "local-cpu", "--config", f"local-cpu={bad}", "--list"]) == 2
    assert "finetune.lora_r: unknown key; did you mean 'r'?" in capsys.readouterr().err


def test_overrides_apply_on_top_of_the_config_and_are_validated():
    from flows.pipeline import apply_run_overrides

    base = PipelineConfig()
    assert apply_run_overrides(base, None) is base
    changed = apply_run_overrides(base, ["finetune.max_steps=7", "export.precision=int8"])
    assert changed.finetune.max_steps == 7 and changed.export.precision == "int8"
    assert changed.model == base.model
    with pytest.raises(ConfigError, match=r"overrides: finetune.lora_r: unknown key; did you mean 'r'\?"):
        apply_run_overrides(base, ["finetune.lora_r=8"])
    with pytest.raises(ConfigError, match=r"finetune.r: Input should be greater than or equal to 1"):
        apply_run_overrides(base, ["finetune.r=0"])


def test_flow_parameters_render_as_a_described_form(deploy):
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import slmflow_pipeline

    schema = parameter_schema(slmflow_pipeline.fn).model_dump()
    assert list(schema["properties"]) == ["config", "overrides", "resolved_inputs"]
    assert all(p.get("description") for p in schema["properties"].values())
    params = slmflow_pipeline.validate_parameters({})
    assert isinstance(params["config"], PipelineConfig) and params["overrides"] is None
    assert params["resolved_inputs"] is None
    # A deployment's form: the config and the overrides only (its runs resolve their inputs).
    deployment = deploy.build_deployment(deploy.DEPLOYMENTS[0])
    form = deployment._parameter_openapi_schema.model_dump()
    assert list(form["properties"]) == ["config", "overrides"]
    assert not {"RunInputs", "Store", "ArtifactRef"} & set(form["definitions"])


def test_show_config_json_round_trips(capsys):
    from slmflow.cli import main

    assert main(["show-config", "--config", str(REPO / "configs/tiny-phi3_lora_cpu.yaml"),
                 "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert PipelineConfig.model_validate(data).model.name_or_path == "runs/tiny-phi3"


def test_stack_refuses_a_taken_port(tmp_path, monkeypatch, capsys):
    import socket

    stack = _load(REPO / "infra" / "local" / "stack.py", "slmflow_stack")
    monkeypatch.setenv("SLMFLOW_STATE_DIR", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert stack.main(["up", "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is taken" in capsys.readouterr().err
    assert not (tmp_path / "pids.json").exists()
