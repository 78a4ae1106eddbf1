"""End-to-end fixtures: a temporary Prefect API on 127.0.0.1, the default SmolLM2 run, a local stack,
Azurite (Azure Blob on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's test harness: a throwaway SQLite database and API server, stopped afterwards."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def slmflow_run(out: Path, home: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`slmflow run` as a user types it (ephemeral Prefect in `home`); the process and its report."""
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "slmflow.cli", "run", "--set", f"output_dir={out}"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out / 'report.json'}"
    return proc, json.loads((out / "report.json").read_text())


# The embedded default's own quality gate (0.02, under 3 of its 144 eval rows) is a verdict on
# this machine's floats: the run reports it, bench/bench_default_run.py prints it. The shared
# run keeps everything else of the default and lets tests judge with margins no CPU crosses.
SMOLLM2_GATE = "evaluate.max_accuracy_drop=0.1"


class DefaultRun:
    """One `slmflow run` of the embedded default: its output folder, Prefect home and report."""

    def __init__(self, root: Path) -> None:
        self.out, self.home = root / "run", root / "prefect"
        self.report = self.run()[1]

    def run(self, *overrides: str) -> tuple[subprocess.CompletedProcess, dict]:
        """`slmflow run` again into the same folder (a rerun, or one with `--set` changes)."""
        return slmflow_run(self.out, self.home, SMOLLM2_GATE, *overrides)


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory: pytest.TempPathFactory) -> DefaultRun:
    """The embedded default (SmolLM2-135M, 100 LoRA steps, int4 k_quant) run once for the
    whole session through `slmflow run`: every test that needs a really fine-tuned model shares
    it (minutes on 2 cores)."""
    return DefaultRun(tmp_path_factory.mktemp("smollm2"))


class LocalStack:
    """A Prefect server on 127.0.0.1 started by `infra/local/up` (pools, deployments), no worker."""

    def __init__(self, port: int, workdir, state) -> None:
        import os
        import sys
        from pathlib import Path

        self.port, self.workdir, self.state = port, workdir, state
        self.url = f"http://127.0.0.1:{port}"
        self.bin = Path(sys.executable).parent
        self.env = dict(os.environ, PREFECT_API_URL=f"{self.url}/api",
                        PREFECT_HOME=str(state / "client-home"),
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", SLMFLOW_STATE_DIR=str(state))

    def api(self, path: str, body: dict | None = None, method: str | None = None):
        import json
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/api{path}", data=data, method=method or (
            "GET" if body is None else "POST"), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or "null")

    def deployment(self, name: str = "local-cpu") -> dict:
        return self.api(f"/deployments/name/slmflow-pipeline/{name}")

    def flow_runs(self, deployment_id: str) -> list[dict]:
        return self.api("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}},
                                              "sort": "EXPECTED_START_TIME_DESC"})

    def artifacts(self, flow_run_id: str) -> dict[str, dict]:
        found = self.api("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        return {a["key"]: a for a in found if a.get("key")}

    def wait_for_new_run(self, deployment_id: str, known: set[str], timeout: float = 60) -> dict:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = [r for r in self.flow_runs(deployment_id) if r["id"] not in known]
            if new:
                return new[0]
            time.sleep(0.5)
        raise AssertionError(f"no new flow run of deployment {deployment_id} in {timeout} s")

    def work_once(self, pool: str = "local-cpu", timeout: float = 600):
        """`prefect worker start --run-once`: picks up the scheduled run and runs it to its end."""
        import subprocess

        return subprocess.run(
            [str(self.bin / "prefect"), "worker", "start", "--pool", pool, "--run-once"],
            cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout,
            check=False)


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory):
    """`infra/local/up` on a free port (SQLite, tiny Phi-3 as local-cpu's config), then `down`."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from slmflow.tiny import build_tiny_phi3

    repo = Path(__file__).resolve().parents[2]
    root = tmp_path_factory.mktemp("stack")
    workdir, state = root / "work", root / "state"
    build_tiny_phi3(workdir / "runs" / "tiny-phi3", seed=0)  # configs/tiny-phi3_lora_cpu.yaml's path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stack = LocalStack(port, workdir, state)
    script = [sys.executable, str(repo / "infra" / "local" / "stack.py")]
    up = subprocess.run(
        [*script, "up", "--port", str(port), "--no-worker", "--workdir", str(workdir),
         "--deploy-config", "local-cpu=configs/tiny-phi3_lora_cpu.yaml"],
        env=stack.env, capture_output=True, text=True, timeout=300, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        stack.up_output = up.stdout
        yield stack
    finally:
        subprocess.run([*script, "down"], env=stack.env, capture_output=True, timeout=120,
                       check=True)


# Azurite's documented development account (public, the same in every Azurite).
ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _azurite_bin() -> Path:
    if not (shutil.which("node") and shutil.which("npm")):
        reason = "Azurite needs node and npm (apt-get install nodejs npm)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI has them: a missing one is a broken CI, not a skip
        pytest.skip(reason)
    home = Path(os.environ.get("SLMFLOW_AZURITE_DIR", Path.home() / ".cache/slmflow/azurite"))
    binary = home / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "azurite@3"],
                       cwd=home, check=True, timeout=600)
    return binary


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    """Azurite's blob service on 127.0.0.1 (a free port, a temporary folder), stopped afterwards."""
    binary = _azurite_bin()
    port = _free_port()
    data = tmp_path_factory.mktemp("azurite")
    proc = subprocess.Popen(
        [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data),
         "--silent", "--skipApiVersionCheck", "--loose"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Azurite did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
        yield (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={DEV_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
