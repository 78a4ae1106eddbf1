"""A run split across work pools on a real server, real workers and real storage.

`infra/local/up` serves the Prefect API on this machine's non-loopback address with API
authentication on (the one test server that is not on 127.0.0.1). Two process pools, each with
its own working directory, share nothing but an Azurite blob container (`cache_remote`):
`split-a` (one worker) gets the fine-tune, `split-b` (two workers, one flow run at a time each)
everything else, the recipe candidates included. The pipeline's own flow run is `slmflow run`
in a third directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
REMOTE = "az://slmflow/split"
COMMON = ["finetune.max_steps=8", "finetune.checkpoint_every=8", "evaluate.limit=8",
          f"cache_remote={REMOTE}", "export.recipe=auto",
          "export.search.candidates=[int4_rtn_b32, int4_rtn_b128]", "export.search.max_parallel=2"]
PLACED = ["placement.finetune=split-a", *(f"placement.{k}=split-b" for k in (
    "base_model", "prepare_data", "merge", "export", "evaluate", "recipe_candidates"))]


def _address() -> str:
    """This machine's address on its default route (no packet is sent), else all interfaces."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
    except OSError:
        return "0.0.0.0"


class Split:
    def __init__(self, root: Path, azurite: str, tiny_model: Path) -> None:
        self.root, self.tiny = root, tiny_model
        self.host = _address()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        client = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        self.api_url = f"http://{client}:{self.port}/api"
        self.auth_file = root / "prefect-auth"
        self.auth_file.write_text(f"slmflow:{os.urandom(12).hex()}\n")
        self.auth_file.chmod(0o600)
        self.env = {**os.environ, "PREFECT_API_URL": self.api_url,
                    "PREFECT_API_AUTH_STRING": self.auth_file.read_text().strip(),
                    "PREFECT_HOME": str(root / "client-home"), "PREFECT_WORKER_QUERY_SECONDS": "1",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "SLMFLOW_STATE_DIR": str(root / "state"),
                    "AZURE_STORAGE_CONNECTION_STRING": azurite}
        self.env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
        self.workers: dict[str, subprocess.Popen] = {}

    def api(self, path: str, body: dict | None = None, auth: bool = True):
        import base64

        req = urllib.request.Request(f"{self.api_url}{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        if auth:
            token = base64.b64encode(self.env["PREFECT_API_AUTH_STRING"].encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or "null")

    def stage_runs(self, pool: str) -> list[dict]:
        deployment = self.api(f"/deployments/name/slmflow-stage/{pool}")
        return self.api("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}},
                                              "sort": "START_TIME_ASC"})

    def task_runs(self, flow_run_id: str) -> list[dict]:
        return self.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})

    def run(self, cwd: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
        """`slmflow run` of the tiny config in `cwd` against this server; (process, seconds).
        An override `--no-prefect` runs the stages as plain functions in that one process."""
        cmd = [sys.executable, "-m", "slmflow.cli", "run", "--config",
               str(REPO / "configs" / "tiny-phi3_lora_cpu.yaml"),
               "--set", f"model.name_or_path={self.tiny}", "--set", "output_dir=runs/tiny"]
        for item in (*COMMON, *overrides):
            cmd += [item] if item.startswith("--") else ["--set", item]
        cwd.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=900, check=False)
        return proc, time.perf_counter() - t0

    def start_worker(self, pool: str, name: str) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - the worker keeps it open
        self.workers[name] = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name, "--limit", "1"],
            cwd=self.root / pool, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _create_pools(split: Split) -> None:
    template = json.loads(subprocess.run(
        [str(BIN / "prefect"), "work-pool", "get-default-base-job-template", "--type", "process"],
        env=split.env, capture_output=True, text=True, check=True, timeout=120).stdout)
    for pool in ("split-a", "split-b"):
        (split.root / pool).mkdir()
        template["variables"]["properties"]["working_dir"]["default"] = str(split.root / pool)
        path = split.root / f"{pool}.json"
        path.write_text(json.dumps(template))
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process",
                        "--base-job-template", str(path)], env=split.env, capture_output=True,
                       check=True, timeout=120)
    subprocess.run([sys.executable, str(REPO / "deployments" / "deploy.py"), "--stages-on", "split-a",
                    "--stages-on", "split-b"], env=split.env, capture_output=True, check=True,
                   timeout=300)


@pytest.fixture(scope="module")
def split(azurite, tiny_model, tmp_path_factory):
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(azurite).create_container("slmflow")
    s = Split(tmp_path_factory.mktemp("split"), azurite, tiny_model)
    stack = [sys.executable, str(REPO / "infra" / "local" / "stack.py")]
    up = subprocess.run([*stack, "up", "--host", s.host, "--port", str(s.port), "--auth-file",
                         str(s.auth_file), "--no-worker", "--workdir", str(s.root / "w")],
                        env=s.env, capture_output=True, text=True, timeout=300, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        _create_pools(s)
        s.start_worker("split-a", "worker-a")
        s.start_worker("split-b", "worker-b1")
        s.start_worker("split-b", "worker-b2")
        yield s
    finally:
        s.stop_workers()
        subprocess.run([*stack, "down"], env=s.env, capture_output=True, timeout=120, check=False)


def test_the_api_answers_401_without_credentials(split):
    with pytest.raises(urllib.error.HTTPError) as refused:
        split.api("/flows/filter", {}, auth=False)
    assert refused.value.code == 401
    assert isinstance(split.api("/flows/filter", {}), list)
    assert split.host != "127.0.0.1"


def test_a_missing_pool_is_refused_before_any_stage(split):
    known = len(split.api("/flow_runs/filter", {}))
    proc, _ = split.run(split.root / "refused", *PLACED, "placement.merge=no-such-pool")
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: placement.merge: work pool 'no-such-pool' does not exist")
    assert "prefect work-pool create no-such-pool --type process" in line
    assert len(split.api("/flow_runs/filter", {})) == known  # no flow run, no stage


def _reference_run(split: Split) -> tuple[dict, float]:
    """The same config in one process (`slmflow run --no-prefect`), into the same container,
    emptied afterwards so that the split run builds every stage again under the same keys."""
    from azure.storage.blob import BlobServiceClient

    proc, seconds = split.run(split.root / "inproc", "--no-prefect")
    assert proc.returncode == 0, proc.stderr[-4000:]
    container = BlobServiceClient.from_connection_string(
        split.env["AZURE_STORAGE_CONNECTION_STRING"]).get_container_client("slmflow")
    for blob in list(container.list_blobs(name_starts_with="split/")):
        container.delete_blob(blob.name)
    return json.loads((split.root / "inproc" / "runs" / "tiny" / "report.json").read_text()), seconds


def _same_outcome(split_report: dict, reference: dict) -> None:
    assert split_report["stages"].keys() == reference["stages"].keys()
    for label, row in reference["stages"].items():
        got = split_report["stages"][label]
        # The chosen candidate was evaluated on the eval split in the search already: its
        # evaluate_exported is that result, found in the store (both runs), not built again.
        again = label == "evaluate_exported"
        assert (got["key"], got["cached"], row["cached"]) == (row["key"], again, again), label
        if not label.startswith("evaluate"):  # an evaluation's folder holds its latencies too
            assert got["sha256"] == row["sha256"], label
    for model, row in reference["models"].items():
        for metric in ("accuracy", "macro_f1", "confusion"):  # (size_bytes counts the manifest,
            # which names the folder: its length differs by working directory)
            assert split_report["models"][model][metric] == row[metric], (model, metric)
    fields = ("recipe", "verdict", "size_bytes", "accuracy", "onnx_key", "evaluation_key")
    assert [{f: c.get(f) for f in fields} for c in split_report["export_search"]["candidates"]] == [
        {f: c.get(f) for f in fields} for c in reference["export_search"]["candidates"]]
    assert split_report["export_search"]["chosen"] == reference["export_search"]["chosen"]


def _ran_once_on_its_pool(split: Split) -> dict[str, list[dict]]:
    runs = {pool: split.stage_runs(pool) for pool in ("split-a", "split-b")}
    assert [r["name"] for r in runs["split-a"]] == ["finetune"]
    candidates = [f"export[{n}], evaluate_exported[{n}]" for n in ("int4_rtn_b32", "int4_rtn_b128")]
    assert sorted(r["name"] for r in runs["split-b"]) == sorted(
        ["base_model", "prepare_data", "merge", "evaluate_base", "evaluate_merged", *candidates])
    for run in runs["split-a"] + runs["split-b"]:
        assert run["state_type"] == "COMPLETED", run["name"]
        assert run["parent_task_run_id"], run["name"]  # shown under the pipeline's task
        tasks = sorted(t["name"] for t in split.task_runs(run["id"]))
        assert tasks == sorted(run["name"].split(", ")), (run["name"], tasks)
    [finetune] = runs["split-a"]  # its progress artifact: in the sub-run, at 100 % when done
    progress = split.api("/artifacts/filter", {"artifacts": {
        "key": {"any_": ["finetune-progress"]}, "flow_run_id": {"any_": [finetune["id"]]}}})
    assert [a["data"] for a in progress] == [100.0]
    a, b = split.log("worker-a"), split.log("worker-b1") + split.log("worker-b2")
    assert "Task run 'finetune' - Finished in state Completed()" in a
    assert "Task run 'merge'" not in a and "Task run 'finetune'" not in b
    for name in ("merge", "evaluate_base", "export[int4_rtn_b32]", "evaluate_exported[int4_rtn_b128]"):
        assert f"Task run '{name}' - Finished in state Completed()" in b, name
    return runs


def _timeline(split: Split, runs: dict[str, list[dict]], report: dict) -> None:
    """Where a placed stage's seconds go: waiting for a worker and its process, the sub-run
    (inputs pulled, the stage task, which pushes its output), the parent pulling it back."""
    from datetime import datetime

    def t(stamp: str) -> float:
        return datetime.fromisoformat(stamp).timestamp()

    print("\nstage                        parent  wait  sub-run  task")
    for run in runs["split-a"] + runs["split-b"]:
        label = run["name"].split(", ")[0]
        task = sum(t(r["end_time"]) - t(r["start_time"]) for r in split.task_runs(run["id"]))
        print(f"{label:28s} {report['stages'][label]['seconds']:6.1f} "
              f"{t(run['start_time']) - t(run['created']):5.1f} "
              f"{t(run['end_time']) - t(run['start_time']):7.1f} {task:5.1f}")


def test_split_run_matches_the_in_process_run_and_reruns_from_the_store(split):
    reference, in_process = _reference_run(split)
    proc, seconds = split.run(split.root / "parent", *PLACED)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((split.root / "parent" / "runs" / "tiny" / "report.json").read_text())
    _same_outcome(report, reference)
    runs = _ran_once_on_its_pool(split)
    first, second = (r for r in runs["split-b"] if r["name"].startswith("export["))
    assert first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"]
    _timeline(split, runs, report)
    print(f"wall time: in one process {in_process:.1f} s, split over two pools {seconds:.1f} s")

    again, rerun = split.run(split.root / "parent", *PLACED)
    assert again.returncode == 0, again.stderr[-4000:]
    cached = json.loads((split.root / "parent" / "runs" / "tiny" / "report.json").read_text())
    assert all(s["cached"] for s in cached["stages"].values()), cached["stages"]
    assert {p: len(split.stage_runs(p)) for p in runs} == {p: len(r) for p, r in runs.items()}
    # seven stages (evaluate_exported included), and the two candidates (export and
    # evaluation, one sub-run each)
    assert again.stderr.count("in the store already; not dispatched") == 9
    print(f"rerun, all cached, nothing dispatched: {rerun:.1f} s")


def _kill_when_running(split: Split, known: set[str]) -> dict:
    """SIGKILL the flow-run process of the next fine-tune on split-a once its task runs."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for run in split.stage_runs("split-a"):
            running = [t for t in split.task_runs(run["id"]) if t["state_type"] == "RUNNING"]
            if run["id"] not in known and run["infrastructure_pid"] and running:
                time.sleep(2)  # into the training
                os.kill(int(run["infrastructure_pid"]), signal.SIGKILL)
                return run
        time.sleep(0.2)
    raise AssertionError("the fine-tune's flow run never ran on split-a")


def test_a_stage_killed_on_its_worker_fails_the_run_and_a_rerun_completes(split):
    from concurrent.futures import ThreadPoolExecutor

    from azure.storage.blob import BlobServiceClient

    container = BlobServiceClient.from_connection_string(
        split.env["AZURE_STORAGE_CONNECTION_STRING"]).get_container_client("slmflow")
    adapters = {b.name for b in container.list_blobs(name_starts_with="split/adapter/")}
    known = {r["id"] for r in split.stage_runs("split-a")}
    # fine-tune on split-a, export on split-b, the rest in the flow's own process
    placed = ["finetune.seed=1", "export.recipe=manual", "placement.finetune=split-a",
              "placement.export=split-b"]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(split.run, split.root / "killed", *placed)
        killed = _kill_when_running(split, known)
        proc, _ = running.result()
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: finetune: its flow run 'finetune' on work pool 'split-a' ended "
                           "Crashed: Process exited with status code: -9"), last
    assert f"/runs/flow-run/{killed['id']}" in last
    assert {b.name for b in container.list_blobs(name_starts_with="split/adapter/")} == adapters
    store = split.root / "split-a" / "stage-store" / "adapter"
    assert not [p for p in store.iterdir() if not p.name.startswith(".") and
                p.suffix not in (".lock", ".json") and f"split/adapter/{p.name}/slmflow-artifact.json" not in adapters]

    again, _ = split.run(split.root / "killed", *placed)
    assert again.returncode == 0, again.stderr[-4000:]
    report = json.loads((split.root / "killed" / "runs" / "tiny" / "report.json").read_text())
    assert report["training"]["steps"] == 8 and not report["stages"]["finetune"]["cached"]
    assert [r["state_type"] for r in split.stage_runs("split-a") if r["id"] not in known] == [
        "CRASHED", "COMPLETED"]
