"""Robustness on the tiny Phi-3: crash and resume, retries, concurrent runs, secrets.

Each test runs the tiny pipeline (or part of it) with few fine-tuning steps and one torch thread,
so that it takes well under a minute on a shared 2-core CPU.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmflow.artifacts import read_verified
from slmflow.configio import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny-phi3_lora_cpu.yaml"
pytestmark = pytest.mark.slow

STAGES = ["base_model", "prepare_data", "finetune", "merge", "export",
          "evaluate_base", "evaluate_merged", "evaluate_exported"]
KINDS = ["base_model", "dataset", "adapter", "merged_model", "onnx_model", "evaluation"]

# Crash and resume: 12 steps of batch 16 (48 training rows: 3 steps an epoch), a checkpoint
# every 4 steps; the kill comes after checkpoint-4 or -8, so the resumed run starts inside a later
# epoch, whose batch order it must reproduce (it did not before finetune's epoch-seeded sampler).
RESUME_STEPS = ["finetune.max_steps=12", "finetune.checkpoint_every=4", "finetune.batch_size=16"]
# Adapter tensors after resume vs an uninterrupted run. HF Trainer restores the optimizer,
# scheduler and RNG states and skips the batches done; the batch order is a function of (seed,
# epoch); the tiny config has no dropout. So the same float operations run in the same order and
# the measured max |diff| is 0.0 (also at 40 steps resumed from step 20). The tolerance leaves
# room only for reduction-order noise of float32 kernels (~1e-7 relative); a wrong batch order,
# LR schedule or optimizer state shows as ~1e-2 (the order bug measured 2.1e-2).
RESUME_TOLERANCE = 1e-6


def _cli(out: Path, *overrides: str) -> list[str]:
    """The plain CLI run of the tiny config (`[stage] done:|cached:` lines on stderr)."""
    cmd = [sys.executable, "-m", "slmflow.cli", "run", "--no-prefect", "--config", CONFIG,
           "--set", f"output_dir={out}"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread here and in the runs started: on a small shared CPU, torch's default
    (a thread a core) spins against other processes; a tiny-model step took 2.9 s, not 0.15 s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def _stage_lines(stderr: str) -> dict[str, str]:
    """`[stage] done: URI` / `[stage] cached: URI` lines of the plain runner: stage -> outcome."""
    return dict(re.findall(r"^\[(\w+)\] (done|cached): ", stderr, flags=re.MULTILINE))


def _complete_checkpoints(adapter_kind: Path) -> list[int]:
    steps = []
    for state in adapter_kind.glob(".work-*/checkpoints/checkpoint-*/trainer_state.json"):
        try:
            steps.append(json.loads(state.read_text())["global_step"])
        except (ValueError, KeyError, OSError):  # being written
            continue
    return sorted(steps)


def _reference_adapter(config) -> Path:
    """The same fine-tune, uninterrupted, in this process (plain stage functions)."""
    from slmflow.preflight import validate_run
    from slmflow.stage import run_stage
    from slmflow.stages import STAGES

    quiet = lambda m: None
    src = validate_run(config)
    base = run_stage(STAGES["base_model"], config.model, src.store, log=quiet,
                     source=src.model_source)
    data = run_stage(STAGES["prepare_data"], config.data, src.store, log=quiet, base=base,
                     train_source=src.train_source, eval_source=src.eval_source,
                     loss_on=config.finetune.loss_on)
    return run_stage(STAGES["finetune"], config.finetune, src.store, log=quiet, base=base,
                     data=data).path


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def test_sigkill_during_finetune_resumes_from_checkpoint_and_matches(tiny_model, tmp_path):
    out = tmp_path / "run"
    overrides = [f"model.name_or_path={tiny_model}", *RESUME_STEPS]
    adapter_kind = out / "cache" / "adapter"
    log1 = tmp_path / "first.log"

    # 1. Start, wait for a complete checkpoint before the last step, SIGKILL.
    t0 = time.perf_counter()
    with open(log1, "w") as err:
        proc = subprocess.Popen(_cli(out, *overrides), cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not [s for s in _complete_checkpoints(adapter_kind) if 4 <= s < 12]:
                assert proc.poll() is None, "run ended before a checkpoint: " + log1.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kill_seconds = time.perf_counter() - t0
    killed_at = max(_complete_checkpoints(adapter_kind))
    first = _stage_lines(log1.read_text())
    assert first == {"base_model": "done", "prepare_data": "done"}, first

    # The kill left no adapter folder a later run could take as done: only the lock, the work
    # folder with its checkpoints and the abandoned temporary build folder.
    left = sorted(p.name for p in adapter_kind.iterdir())
    assert not [n for n in left if not n.startswith(".") and not n.endswith(".lock")], left
    assert any(n.startswith(".tmp-") for n in left), left

    # 2. Start again: it resumes from the last checkpoint, skips the finished stages, completes.
    t0 = time.perf_counter()
    again = subprocess.run(_cli(out, *overrides), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=600, check=False)
    resume_seconds = time.perf_counter() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from checkpoint-{killed_at} (step {killed_at})" in again.stderr, again.stderr[-3000:]
    lines = _stage_lines(again.stderr)
    assert lines["base_model"] == "cached" and lines["prepare_data"] == "cached", lines
    assert all(lines[s] == "done" for s in STAGES[2:]), lines
    report = json.loads((out / "report.json").read_text())
    training = report["training"]
    assert training["steps"] == 12 and training["resumed_from_step"] == killed_at
    # The loss curve joins the checkpoint's history and the resumed steps: one point a step.
    assert [p["step"] for p in training["loss_curve"]] == list(range(1, 13))
    # Nothing of the killed attempt is left behind once the stage is built.
    assert sorted(p.name for p in adapter_kind.iterdir() if p.name.startswith(".")) == [], (
        list(adapter_kind.iterdir()))

    # 3. The adapter equals an uninterrupted run's with the same seeds.
    ref_config = load_config(REPO / CONFIG, [*overrides, f"output_dir={tmp_path / 'ref'}"])
    t0 = time.perf_counter()
    ref = _reference_adapter(ref_config)
    ref_seconds = time.perf_counter() - t0
    resumed = Path(report["stages"]["finetune"]["uri"])
    diff = _max_diff(resumed, ref)
    print(f"resume: killed at step {killed_at}; max |adapter diff| vs uninterrupted = {diff:.3g}; "
          f"seconds: to the kill {kill_seconds:.1f}, resumed run {resume_seconds:.1f}, "
          f"uninterrupted fine-tune {ref_seconds:.1f}", file=sys.stderr)
    assert diff <= RESUME_TOLERANCE
    ref_log = json.loads((ref / "train_log.json").read_text())
    assert [p["loss"] for p in training["loss_curve"]] == pytest.approx(
        [p["loss"] for p in ref_log], rel=RESUME_TOLERANCE)
    ref_meta = read_verified(ref).meta
    assert training["train_loss"] == pytest.approx(ref_meta["train_loss"], rel=1e-4)


# --------------------------------------------------------------------------------------------
# Retries through Prefect


def _prefect_config(tiny_model: Path, out: Path, *overrides: str):
    # A fresh output_dir per test: the store's path is part of every key, so Prefect's
    # persisted results of other tests can never answer for these runs.
    return load_config(REPO / CONFIG, [f"model.name_or_path={tiny_model}", f"output_dir={out}",
                                       "finetune.max_steps=4", "finetune.batch_size=8", *overrides])


def _task_runs(flow_run_id, wait_for: str, timeout: float = 60.0) -> dict[str, int]:
    """Task run name -> run_count (1 + retries taken) for one flow run.

    Prefect 3 records task runs on the server from the events its client sends in the
    background, so right after the flow returns (more so on a busy machine) a task run may not
    be there yet: wait until `wait_for` is, and its last state is final.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        found = {r.name: r for r in runs}
        done = wait_for in found and found[wait_for].state and found[wait_for].state.is_final()
        if done or time.monotonic() > deadline:
            return {name: r.run_count for name, r in found.items()}
        time.sleep(0.5)


def test_transient_failure_is_retried_and_the_run_completes(prefect_api, tiny_model, tmp_path, monkeypatch):
    from flows.pipeline import slmflow_pipeline
    from slmflow.stages import finetune

    calls = []
    real = finetune.load_for_training

    def flaky(*args, **kwargs):  # inside the stage's build: its temp folder exists already
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ConnectionError("injected: connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "load_for_training", flaky)
    config = _prefect_config(tiny_model, tmp_path / "run")
    state = slmflow_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    assert len(calls) == 2 and calls[1] - calls[0] >= 3  # retried once, after retry_delay 3 s
    report = json.loads(Path(state.result()).read_text())
    assert not report["stages"]["finetune"]["cached"] and report["training"]["steps"] == 4
    assert _task_runs(state.state_details.flow_run_id, wait_for="finetune")["finetune"] == 2
    kind = Path(config.output_dir) / "cache" / "adapter"
    assert [p.name for p in kind.iterdir() if p.name.startswith(".")] == []  # failed try's temp gone


def _raise_data_error(*args, **kwargs):
    from slmflow.errors import DataError

    raise DataError("tones.jsonl:7: label 'Angry' is not in data.labels [Sad, Joy, Fear, Surprise]")


def _raise_memory_error(*args, **kwargs):
    raise MemoryError("injected: cannot allocate 8 GiB")


def _raise_cuda_oom(*args, **kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


@pytest.mark.parametrize(("target", "fake", "error", "stage"), [
    ("slmflow.stages.prepare_data.tokenize_example", _raise_data_error, "DataError", "prepare_data"),
    ("slmflow.stages.finetune.load_for_training", _raise_memory_error, "MemoryError", "finetune"),
    ("slmflow.stages.finetune.load_for_training", _raise_cuda_oom, "OutOfMemoryError", "finetune"),
], ids=["data-error", "memory-error", "cuda-oom"])
def test_data_and_memory_errors_are_not_retried(prefect_api, tiny_model, tmp_path, monkeypatch,
                                                 target, fake, error, stage):
    from flows.pipeline import slmflow_pipeline

    calls = []

    def counted(*args, **kwargs):
        calls.append(time.monotonic())
        return fake(*args, **kwargs)

    monkeypatch.setattr(target, counted)
    config = _prefect_config(tiny_model, tmp_path / "run")
    with pytest.raises(BaseException) as info:
        slmflow_pipeline(config)
    failed_after = time.monotonic() - calls[0]
    assert type(info.value).__name__ == error
    assert "injected" in str(info.value) or "Angry" in str(info.value)
    assert len(calls) == 1, f"{error} was retried {len(calls) - 1} times"
    assert failed_after < 3  # at once: no retry delay was waited
    adapter = Path(config.output_dir) / "cache" / ("dataset" if stage == "prepare_data" else "adapter")
    assert not [p for p in adapter.iterdir() if not p.name.startswith(".") and not p.name.endswith(".lock")]


# --------------------------------------------------------------------------------------------
# Concurrency


def _assert_store_whole(store: Path) -> None:
    """No temporary or stale folder is left, and every stage folder verifies."""
    left = [p for p in store.rglob("*") if p.name.startswith((".tmp-", ".stale-", ".work-"))]
    assert left == [], left
    for kind in KINDS:
        folders = [p for p in (store / kind).iterdir() if p.is_dir()]
        assert folders, kind
        for folder in folders:
            assert read_verified(folder) is not None, folder


def _start_together(cmds: list[list[str]], env: dict[str, str], tmp_path: Path) -> list[tuple[int, str]]:
    procs, logs = [], []
    for i, cmd in enumerate(cmds):
        log = open(tmp_path / f"run{i}.log", "w+")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    out = []
    for code, log in zip(codes, logs):
        log.seek(0)
        out.append((code, log.read()))
        log.close()
    return out


def test_two_plain_runs_together_build_each_stage_once(tiny_model, tmp_path):
    out = tmp_path / "shared"
    cmd = _cli(out, f"model.name_or_path={tiny_model}", "finetune.max_steps=4", "finetune.batch_size=8")
    t0 = time.perf_counter()
    (code_a, log_a), (code_b, log_b) = _start_together([cmd, cmd], _env(), tmp_path)
    seconds = time.perf_counter() - t0
    assert code_a == 0, log_a[-3000:]
    assert code_b == 0, log_b[-3000:]
    a, b = _stage_lines(log_a), _stage_lines(log_b)
    assert set(a) == set(b) == set(STAGES)
    for stage in STAGES:  # one built it, the other waited on the lock and reused it
        assert sorted([a[stage], b[stage]]) == ["cached", "done"], (stage, a, b)
    _assert_store_whole(out / "cache")
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == set(STAGES)
    print(f"concurrency (plain): two runs together {seconds:.1f} s", file=sys.stderr)


# Lines a stage logs only when it builds (Prefect's log lines; the Trainer prints its summary).
BUILD_MARKERS = {
    "prepare_data": r"- data: \d+ train",
    "finetune": r"'train_runtime'",
    "merge": r"- merge: max \|logit diff\|",
    "export": r"- export: loads and generates",
    "evaluate_base": r"- evaluate base_model on eval: accuracy",
    "evaluate_merged": r"- evaluate merged_model on eval: accuracy",
    "evaluate_exported": r"- evaluate onnx_model on eval: accuracy",
}


def test_two_prefect_runs_together_against_one_api(prefect_api, tiny_model, tmp_path):
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "shared"
    cmd = _cli(out, f"model.name_or_path={tiny_model}", "finetune.max_steps=4", "finetune.batch_size=8")
    cmd.remove("--no-prefect")
    env = {**_env(), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    t0 = time.perf_counter()
    (code_a, log_a), (code_b, log_b) = _start_together([cmd, cmd], env, tmp_path)
    seconds = time.perf_counter() - t0
    assert code_a == 0, log_a[-3000:]
    assert code_b == 0, log_b[-3000:]
    _assert_store_whole(out / "cache")
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == set(STAGES)
    # Each stage was built by one of them: the lines only a build logs appear once in all.
    both = log_a + log_b
    built = {stage: len(re.findall(marker, both)) for stage, marker in BUILD_MARKERS.items()}
    assert all(n == 1 for n in built.values()), built
    for log in (log_a, log_b):
        assert len(re.findall(r"Task run '\w+' - Finished in state (Completed|Cached)", log)) == len(STAGES)
    # A third run finds everything cached.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    cached = {k: v["cached"] for k, v in json.loads((out / "report.json").read_text())["stages"].items()}
    assert all(cached.values()), cached
    print(f"concurrency (Prefect): two runs together {seconds:.1f} s; built {built}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Secrets

SECRETS = {"HF_TOKEN": "hf_slmflowTESTsecret123", "AZURE_CLIENT_SECRET": "azSecretTEST456"}
HUB_ID = "slmflow-test/tiny-phi3"  # a hub id, so the base-model stage reads the token


def _searchable(file: Path) -> bytes:
    """A file's bytes; for a Prefect result record also its result, whose pickle is base64 there."""
    blob = file.read_bytes()
    if file.parent.name == "prefect-results":
        import base64

        record = json.loads(blob)
        pickled = base64.b64decode(record["result"])
        assert b"slmflow.artifacts" in pickled  # decoded: an ArtifactRef pickle
        blob += pickled
    return blob


def _leaks(where: Path | str, text: str | None = None) -> list[str]:
    """Which secret values appear in `text`, or in any file under the folder `where`."""
    if text is not None:
        return [f"{where}: {name}" for name, v in SECRETS.items() if v in text]
    files = [p for p in Path(where).rglob("*") if p.is_file()]
    assert files
    found = []
    for file in files:
        blob = _searchable(file)
        found += [f"{file}: {name}" for name, v in SECRETS.items() if v.encode() in blob]
    return found


def test_plain_run_leaks_no_secret(tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        _cli(out, f"model.name_or_path={tiny_model}", "finetune.max_steps=4", "finetune.batch_size=8"),
        cwd=REPO, env=_env(**SECRETS), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    assert _leaks(out) == []
    assert _leaks("stdout", proc.stdout) == [] and _leaks("stderr", proc.stderr) == []


@pytest.fixture
def fake_hub(tiny_model, monkeypatch):
    """`from_pretrained(HUB_ID, token=...)` loads the tiny model, the preflight's `model_info`
    answers without the network; both record the token they were given."""
    import huggingface_hub
    import transformers
    from huggingface_hub.hf_api import ModelInfo

    tokens = []

    def model_info(repo_id, *args, token=None, **kwargs):
        assert repo_id == HUB_ID
        tokens.append(token)
        return ModelInfo(id=repo_id)

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained

        def fake(name, *args, _real=real, **kwargs):
            if str(name) == HUB_ID:
                tokens.append(kwargs.pop("token", None))
                kwargs.pop("revision", None)
                name = tiny_model
            return _real(name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", fake)
    return tokens


def test_prefect_run_with_hub_token_leaks_no_secret(prefect_api, tiny_model, fake_hub, tmp_path,
                                                    monkeypatch, capfd):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    from flows.pipeline import slmflow_pipeline

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    config = _prefect_config(tiny_model, tmp_path / "run", f"model.name_or_path={HUB_ID}")
    state = slmflow_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    # The token was read and given to the hub calls (the preflight's look-up, the download).
    assert len(fake_hub) >= 2 and set(fake_hub) == {SECRETS["HF_TOKEN"]}
    out = Path(config.output_dir)
    assert list((out / "cache" / "prefect-results").iterdir())  # persisted results exist
    assert _leaks(out) == []  # report.json, report.md, stage folders, prefect-results (pickles)
    captured = capfd.readouterr()
    assert _leaks("stdout", captured.out) == [] and _leaks("stderr", captured.err) == []

    # What the Prefect API stored: the flow run's parameters, its logs and its artifacts.
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert len(logs) > 10 and len(artifacts) >= 4
    stored = json.dumps(run.parameters, default=str) + "".join(log.message for log in logs) + "".join(
        json.dumps(a.data, default=str) + (a.description or "") for a in artifacts)
    assert _leaks("Prefect API", stored) == []


def test_hf_token_comes_from_a_prefect_secret_block(prefect_api, monkeypatch):
    from prefect.blocks.system import Secret

    from slmflow.secrets import get_secret

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the API comes from the settings
    Secret(value="hf_slmflowBLOCKsecret789").save("slmflow-test-hf-token", overwrite=True)
    assert get_secret("HF_TOKEN", block="slmflow-test-hf-token") == "hf_slmflowBLOCKsecret789"
    assert get_secret("HF_TOKEN", block="no-such-block") is None
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])  # the environment comes first
    assert get_secret("HF_TOKEN", block="slmflow-test-hf-token") == SECRETS["HF_TOKEN"]


def _from_pretrained_calls() -> list[tuple[str, int, ast.Call]]:
    calls = []
    for file in sorted((REPO / "src" / "slmflow").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "from_pretrained":
                calls.append((file.relative_to(REPO).as_posix(), node.lineno, node))
    return calls


def _keywords(call: ast.Call, tree_of: Path) -> dict[str, ast.expr]:
    """The call's keywords, with `**kwargs` expanded where kwargs is a dict literal in the file."""
    kw = {k.arg: k.value for k in call.keywords if k.arg}
    for star in (k.value for k in call.keywords if k.arg is None):
        if isinstance(star, ast.Name):
            for node in ast.walk(ast.parse(tree_of.read_text())):
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if any(isinstance(t, ast.Name) and t.id == star.id for t in targets):
                        kw.update({k.value: v for k, v in zip(node.value.keys, node.value.values)
                                   if isinstance(k, ast.Constant)})
    return kw


def test_models_load_from_safetensors_without_remote_code_by_default():
    from slmflow.config import PipelineConfig

    assert PipelineConfig().model.trust_remote_code is False
    problems = []
    calls = _from_pretrained_calls()
    assert len(calls) >= 10
    for file, line, call in calls:
        owner = ast.unparse(call.func.value)
        kw = _keywords(call, REPO / file)
        remote = kw.get("trust_remote_code")
        # trust_remote_code is never switched on in code: absent (False) or the config's value.
        if isinstance(remote, ast.Constant) and remote.value is not False:
            problems.append(f"{file}:{line}: trust_remote_code={remote.value!r}")
        if owner == "AutoModelForCausalLM" and "gguf_file" not in kw:
            safetensors = kw.get("use_safetensors")
            if not (isinstance(safetensors, ast.Constant) and safetensors.value is True):
                problems.append(f"{file}:{line}: model weights without use_safetensors=True")
        elif owner not in ("AutoModelForCausalLM", "AutoTokenizer", "PeftModel"):
            problems.append(f"{file}:{line}: unexpected loader {owner}")
    assert problems == [], problems
