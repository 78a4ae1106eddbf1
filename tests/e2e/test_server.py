"""Deployments on a real Prefect server (127.0.0.1), triggered from the CLI, run by a worker.

`infra/local/up` starts the server, creates the pools and deploys; each run here is triggered
with `prefect deployment run ... --param ... --watch` and picked up by `prefect worker start
--run-once`, as a user would do it.
"""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.slow


def trigger(stack, params: list[str], pool: str = "local-cpu") -> tuple[dict, str, str]:
    """Trigger local-cpu from the CLI with --watch, run a worker once; (flow run, cli out, worker log)."""
    deployment = stack.deployment()
    known = {r["id"] for r in stack.flow_runs(deployment["id"])}
    cmd = [str(stack.bin / "prefect"), "deployment", "run", "slmflow-pipeline/local-cpu", "--watch"]
    for p in params:
        cmd += ["--param", p]
    watch = subprocess.Popen(cmd, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        run = stack.wait_for_new_run(deployment["id"], known)
        worker = stack.work_once(pool)
        out, _ = watch.communicate(timeout=120)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    assert watch.returncode == 0, out[-3000:] + worker.stderr[-3000:]
    return stack.api(f"/flow_runs/{run['id']}"), out, worker.stdout + worker.stderr


def stages_table(stack, flow_run_id: str) -> dict[str, bool]:
    artifacts = stack.artifacts(flow_run_id)
    rows = json.loads(artifacts["slmflow-stages"]["data"])
    return {row["stage"]: row["cached"] for row in rows}


def test_up_creates_pools_and_deployments(local_stack):
    pools = {p["name"]: p for p in local_stack.api("/work_pools/filter", {})}
    assert pools["local-cpu"]["type"] == "process" and pools["local-gpu"]["type"] == "process"
    template = pools["local-cpu"]["base_job_template"]["variables"]["properties"]
    assert template["working_dir"]["default"] == str(local_stack.workdir)
    cpu = local_stack.deployment("local-cpu")
    gpu = local_stack.deployment("local-gpu")
    assert cpu["entrypoint"] == "flows.pipeline.slmflow_pipeline"  # no path of this machine
    assert cpu["path"] is None and not cpu["pull_steps"]
    assert cpu["parameters"]["config"]["model"]["name_or_path"] == "runs/tiny-phi3"
    assert gpu["parameters"]["config"]["finetune"]["method"] == "qlora"
    assert gpu["parameters"]["config"]["export"]["execution_provider"] == "cuda"
    [schedule] = cpu["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"] is False
    # the UI form: every field of the config tree has a title and a description
    schema = cpu["parameter_openapi_schema"]
    defs = schema["definitions"]
    for name, model in defs.items():
        for field, spec in model["properties"].items():
            # a section ($ref) shows its class's description
            ref = defs[spec["$ref"].rsplit("/", 1)[-1]] if "$ref" in spec else spec
            assert spec.get("title") and ref.get("description"), f"{name}.{field}"


def test_cli_trigger_runs_to_completed_and_rerun_reuses_stages(local_stack):
    run, out, log = trigger(local_stack, ['overrides=["finetune.max_steps=20"]'])
    assert run["state"]["type"] == "COMPLETED", out
    assert "Completed" in out
    assert run["parameters"]["overrides"] == ["finetune.max_steps=20"]
    artifacts = local_stack.artifacts(run["id"])
    assert {"slmflow-models", "slmflow-stages", "slmflow-report"} <= set(artifacts)
    models = {row["model"]: row for row in json.loads(artifacts["slmflow-models"]["data"])}
    assert set(models) == {"Base", "Merged (PyTorch fp32)", "Exported (ONNX)"}
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in models.values()), models
    assert "Quality gate" in artifacts["slmflow-report"]["data"]
    # the training progress artifact belongs to the finetune task run, at 100 % when done
    progress = local_stack.api("/artifacts/filter", {"artifacts": {"key": {"any_": ["finetune-progress"]}}})
    assert any(a["data"] == 100.0 for a in progress)
    assert "Task run 'finetune'" in log and "Task run 'export'" in log  # per-stage logs
    first = stages_table(local_stack, run["id"])
    report = local_stack.workdir / "runs" / "tiny-phi3-lora" / "report.json"
    assert report.exists()

    # a changed evaluation parameter: every stage before evaluation comes from the cache
    run2, out2, _ = trigger(local_stack, ['overrides=["finetune.max_steps=20", "evaluate.max_new_tokens=5"]'])
    assert run2["state"]["type"] == "COMPLETED", out2
    second = stages_table(local_stack, run2["id"])
    assert set(second) == set(first)
    for stage in ("base_model", "prepare_data", "finetune", "merge", "export"):
        assert second[stage] is True, (stage, second)
    for stage in ("evaluate_base", "evaluate_merged", "evaluate_exported"):
        assert second[stage] is False, (stage, second)


def test_cli_refuses_a_bad_parameter_naming_the_field(local_stack):
    bad = subprocess.run(
        [str(local_stack.bin / "prefect"), "deployment", "run", "slmflow-pipeline/local-cpu",
         "--param", 'config={"finetune": {"r": 0}}'],
        env=local_stack.env, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode != 0
    assert "config.finetune.r" in bad.stdout + bad.stderr


def test_bad_override_fails_the_run_before_any_stage(local_stack):
    deployment = local_stack.deployment()
    known = {r["id"] for r in local_stack.flow_runs(deployment["id"])}
    made = subprocess.run(
        [str(local_stack.bin / "prefect"), "deployment", "run", "slmflow-pipeline/local-cpu",
         "--param", 'overrides=["finetune.lora_r=8"]'],
        env=local_stack.env, capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    run = local_stack.wait_for_new_run(deployment["id"], known)
    worker = local_stack.work_once()
    log = worker.stdout + worker.stderr
    run = local_stack.api(f"/flow_runs/{run['id']}")
    assert run["state"]["type"] == "FAILED"
    assert "finetune.lora_r: unknown key; did you mean 'r'?" in log
    tasks = local_stack.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert tasks == []
