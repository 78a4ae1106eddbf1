"""Placement without a server: the config, the refusals at the edge, what arrives where, routing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmflow.artifacts import ArtifactRef, content_ref, named_ref
from slmflow.configio import build_config, load_config
from slmflow.errors import ConfigError
from slmflow.store import Store

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny-phi3_lora_cpu.yaml"


def test_nothing_is_placed_by_default_and_pools_lists_the_placed():
    assert build_config({}).placement.pools() == {}
    cfg = build_config({"cache_remote": "file:///shared/store",
                        "placement": {"finetune": "gpu-a", "recipe_candidates": "cpu-b"}})
    assert cfg.placement.pools() == {"finetune": "gpu-a", "recipe_candidates": "cpu-b"}


@pytest.mark.parametrize("data, match", [
    ({"placement": {"finetune": "gpu-a"}},
     r"placement puts stages on work pools \(finetune on gpu-a\).*set cache_remote"),
    ({"cache_remote": "az://c/p", "placement": {"merge": "cpu b"}},
     r"placement\.merge: String should match pattern"),
    ({"cache_remote": "az://c/p", "placement": {"finetun": "gpu-a"}},
     r"placement\.finetun: unknown key; did you mean 'finetune'\?"),
])
def test_bad_placement_names_the_key_and_the_fix(data, match):
    with pytest.raises(ConfigError, match=match):
        build_config(data)


def test_the_split_config_validates_and_puts_only_the_fine_tune_on_the_gpu_pool():
    cfg = load_config(REPO / "configs" / "phi3-mini_qlora_azureml-split.yaml")
    pools = cfg.placement.pools()
    assert pools.pop("finetune") == "azureml" and set(pools.values()) == {"local-cpu"}
    assert cfg.cache_remote and cfg.export.execution_provider == "cpu"
    assert cfg.finetune.device == "cuda" and cfg.finetune.method == "qlora"


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmflow.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_a_placed_run_is_refused_before_any_stage_naming_the_fix(tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "home")  # no profile pointing at a server
    base = ["--config", str(TINY), "--set", f"model.name_or_path={tiny_model}",
            "--set", f"output_dir={tmp_path / 'out'}", "--set", "placement.finetune=gpu-a"]
    cases = [
        (["run", *base], "set cache_remote"),
        (["run", *base, "--set", "cache_remote=file:///tmp/x"], "set PREFECT_API_URL"),
        (["validate", *base, "--set", "cache_remote=file:///tmp/x"], "set PREFECT_API_URL"),
        (["run", "--no-prefect", *base, "--set", "cache_remote=file:///tmp/x"], "drop --no-prefect"),
    ]
    for args, fix in cases:
        done = _cli(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("error: ") and fix in line, line
    assert not (tmp_path / "out").exists()


def test_every_stage_names_the_config_class_its_sub_run_validates():
    from slmflow import config
    from slmflow.placement import config_type
    from slmflow.stages import STAGES

    assert {n: config_type(s) for n, s in STAGES.items()} == {
        "base_model": config.BaseModelConfig, "prepare_data": config.DataConfig,
        "finetune": config.FinetuneConfig, "given_adapter": config.FinetuneConfig,
        "merge": config.MergeConfig,
        "export": config.ExportConfig, "evaluate": config.EvaluateConfig,
        "export_base": config.ExportConfig, "export_adapter": config.ExportConfig}


def _write(out: Path, text: str) -> dict:
    (out / "weights.bin").write_text(text)
    return {"note": text}


def test_a_stage_output_arrives_pulled_and_verified(tmp_path):
    from slmflow.placement import arrive

    remote = f"file://{tmp_path / 'remote'}"
    made = Store.at(tmp_path / "a", remote).build("adapter", "k1", [], lambda o, w: _write(o, "x"))
    here = Store.at(tmp_path / "b", remote)
    got = arrive(made, here, log=lambda m: None)
    assert got.sha256 == made.sha256 and got.uri == str(tmp_path / "b" / "adapter" / "k1")
    with pytest.raises(ConfigError, match=r"adapter/k1: the store holds content .*two builds"):
        arrive(made.model_copy(update={"sha256": "0" * 64}), here)
    with pytest.raises(ConfigError, match=r"adapter/k2 is neither in .* nor in file://"):
        arrive(made.model_copy(update={"key": "k2"}), here)


def test_a_pointer_arrives_where_its_folder_is_with_the_same_content(tmp_path):
    from slmflow.placement import arrive
    from slmflow.stages.base_model import write_pointer

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    source = content_ref("model_source", model)
    meta = {"external_model_dir": str(model)}
    made = Store.at(tmp_path / "a", f"file://{tmp_path / 'remote'}").build(
        "base_model", "p1", [source], lambda o, w: write_pointer(o, model, source.sha256) or meta)
    assert not (tmp_path / "remote" / "base_model").exists()  # a pointer is never uploaded
    got = arrive(made, Store.at(tmp_path / "b", f"file://{tmp_path / 'remote'}"))
    assert got.sha256 == made.sha256 and got.meta["external_model_dir"] == str(model)
    (model / "config.json").write_text('{"changed": true}')
    with pytest.raises(ConfigError, match=rf"the model folder {model} is not on this machine"):
        arrive(made, Store.at(tmp_path / "c", f"file://{tmp_path / 'remote'}"))


def test_input_files_must_be_the_same_here_and_names_pass(tmp_path):
    from slmflow.placement import arrive

    data = tmp_path / "rows.jsonl"
    data.write_text('{"a": 1}\n')
    ref = content_ref("data_source", data)
    store = Store.at(tmp_path / "s")
    assert arrive(ref, store) == ref
    hub = named_ref("model_source", "hf://org/model", {"hub_id": "org/model"})
    assert arrive(hub, store) == hub
    data.write_text('{"a": 2}\n')
    with pytest.raises(ConfigError, match=r"data_source .*rows.jsonl is not on this machine"):
        arrive(ref, store)


def test_a_stage_call_travels_as_json_and_decodes_back():
    from flows.placed import StageCall
    from slmflow.placement import decode_named
    from slmflow.stages import STAGES

    ref = ArtifactRef(kind="onnx_model", uri="/x", sha256="a" * 64, key="k", meta={"m": 1})
    call = StageCall(stage="evaluate", label="evaluate_exported", cfg={"limit": 4},
                     named={"model": ref, "data": None, "labels": ["Joy"]}, key="k2")
    sent = json.loads(json.dumps(call.model_dump(mode="json")))
    back = decode_named(STAGES["evaluate"], StageCall.model_validate(sent).named)
    assert back == {"model": ref, "data": None, "labels": ["Joy"]}


class _FakeTask:
    """Stands in for the `run_placed` task: records what would be dispatched where."""

    def __init__(self):
        self.calls: list[tuple[str, list[str]]] = []

    def with_options(self, **_):
        return self

    def __call__(self, pool, steps, store, timeout, poll):
        self.calls.append((pool, [s.label for s in steps]))
        refs = [ArtifactRef(kind="x", uri="/x", sha256=s.label, key=s.label) for s in steps]
        return [(r, False, 1.0) for r in refs]


def test_the_runner_sends_placed_chains_as_one_and_runs_the_rest_here(monkeypatch, tmp_path):
    from flows import placed
    from flows.steps import Step

    fake = _FakeTask()
    monkeypatch.setattr(placed, "run_placed", fake)
    here: list[tuple[str, dict]] = []

    def fallback(name, label, cfg, store, named):
        here.append((label, named))
        return ArtifactRef(kind="x", uri="/y", sha256=label, key=label), True

    cfg = build_config({"cache_remote": "file:///s",
                        "placement": {"export": "cpu-b", "recipe_candidates": "cpu-b"}})
    runner = placed.PlacedRunner(cfg.placement, fallback)
    store = Store.at(tmp_path)
    export = Step("export", "export[int8]", None, {"merged": 1}, where="recipe_candidates")
    evaluate = Step("evaluate", "evaluate_exported[int8]", None, {}, feed="model",
                    where="recipe_candidates")
    assert [o[0].key for o in runner.chain([export, evaluate], store)] == [
        "export[int8]", "evaluate_exported[int8]"]
    assert fake.calls == [("cpu-b", ["export[int8]", "evaluate_exported[int8]"])]
    # export placed, evaluate here: one step at a time, the output fed on
    outcomes = runner.chain([Step("export", "export", None, {}),
                             Step("evaluate", "evaluate_exported", None, {}, feed="model")], store)
    assert fake.calls[-1] == ("cpu-b", ["export"])
    assert here == [("evaluate_exported", {"model": outcomes[0][0]})]
    assert runner("merge", "merge", None, store, {})[1] is True  # unplaced: in this process


def _load(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_stage_deployments_go_on_every_pool_used_or_placed(capsys):
    deploy = _load(REPO / "deployments" / "deploy.py", "slmflow_deploy_stages")
    assert deploy.main(["--list"]) == 0
    out = capsys.readouterr().out
    for pool in ("local-cpu", "local-gpu", "azureml"):
        assert f"slmflow-stage/{pool}\tpool={pool}\t" in out
    assert "slmflow-pipeline/azureml-split\tpool=local-cpu\t" in out
    assert deploy.main(["--stages-on", "gpu-a", "--list"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "slmflow-stage/gpu-a\tpool=gpu-a\tthe stage flow of placed stages"]
    built = deploy.build_stage_deployment("azureml")
    assert built.entrypoint == "flows.placed.slmflow_stage" and built.storage is None
    assert built.job_variables == {"code_dir": "."}  # as the azureml pipeline deployment
    assert set(built._parameter_openapi_schema.properties) == {"calls", "remote"}
    assert str(REPO) not in json.dumps(built.model_dump(mode="json",
                                                        exclude={"parameter_openapi_schema"}))


@pytest.fixture
def stack(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMFLOW_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    return _load(REPO / "infra" / "local" / "stack.py", "slmflow_stack_auth")


def test_stack_refuses_another_address_without_api_authentication(stack, tmp_path, capsys):
    assert stack.main(["up", "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 opens the Prefect API to other machines" in err and "--auth-file" in err
    assert not (tmp_path / "state" / "pids.json").exists()
    assert stack.is_loopback("127.0.0.1") and stack.is_loopback("::1")
    assert stack.is_loopback("localhost") and not stack.is_loopback("192.0.2.2")


def test_the_auth_secret_comes_from_an_owner_only_file_and_is_never_copied(stack, tmp_path):
    secret = tmp_path / "auth"
    secret.write_text("ops:not-in-argv\n")
    secret.chmod(0o644)
    with pytest.raises(SystemExit, match=r"readable by others; chmod 600"):
        stack.read_auth(str(secret))
    secret.chmod(0o600)
    assert stack.read_auth(str(secret)) == "ops:not-in-argv"
    env = stack.stack_env(4200, tmp_path, "192.0.2.2", "ops:not-in-argv")
    assert env["PREFECT_API_AUTH_STRING"] == "ops:not-in-argv"
    assert env["PREFECT_API_URL"] == "http://192.0.2.2:4200/api"
    assert "PREFECT_SERVER_API_AUTH_STRING" not in env  # the server's own, given to it alone
    stack._write_shell_env(tmp_path, env, str(secret))
    shell = (tmp_path / "env").read_text()
    assert "not-in-argv" not in shell and f"$(cat {secret})" in shell
    assert (tmp_path / "env").stat().st_mode & 0o077 == 0
