"""A throwaway Prefect API for one `slmflow run` with no server configured, started early.

Prefect starts its own ephemeral API only when the flow first calls it: it imports the server's
code into the run's process (~1.5 s here), then spawns the server and waits for it (3 s; 7.4 s on
a new database, which is migrated first). `ephemeral_api()` spawns the same server (Prefect's
app in its ephemeral mode: UI off, 127.0.0.1, a free port, the database in PREFECT_HOME) as soon
as the config is valid, so it starts while the run imports its own code, and stops it when the
run ends. Where an API is configured (PREFECT_API_URL in the environment, a profile or a settings
file), nothing is spawned, or the spawned one is stopped unused.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from importlib.util import find_spec
from pathlib import Path
from typing import Any


def healthy(api_url: str) -> bool:
    """Whether the Prefect API at `api_url` (ending in /api) answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class EphemeralApi:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def spawn(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app_dir = Path(find_spec("prefect").origin).parent.parent  # as Prefect's own ephemeral
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}  # fmt: skip
        env.pop("PREFECT_API_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def wait(self) -> None:
        """Until the API answers; once more on a new port if the server exited (port taken)."""
        deadline = time.monotonic() + self.timeout
        respawned = False
        while time.monotonic() < deadline:
            if healthy(self.url):
                return
            if self.proc.poll() is not None:
                if respawned:
                    break
                respawned = True
                self.spawn()
            time.sleep(0.1)
        code = self.proc.poll()
        self.stop()
        why = f"exited with {code}" if code is not None else f"did not answer within {self.timeout:.0f} s"
        raise RuntimeError(
            f"the temporary Prefect API {why}; set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
            "higher, or start a server (`infra/local/up`) and set PREFECT_API_URL"
        )

    @contextmanager
    def use(self) -> Iterator[None]:
        """Point this process's Prefect client at the server (once it answers)."""
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

        self.wait()
        # No UI is served: no "View at" links to it in the logs.
        with temporary_settings(updates={PREFECT_API_URL: self.url, PREFECT_UI_URL: ""}):
            try:
                yield
            finally:
                _drain_prefect_workers()  # the last logs and events reach it before it stops

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _drain_prefect_workers(timeout: float = 30) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def _configured_api() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


@contextmanager
def ephemeral_api(timeout: float) -> Iterator[Any]:
    """A context to run the flow in: a temporary API, or nothing where one is configured.

    Use as `with ephemeral_api(120) as api: import the flow; with api(): run it`.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield nullcontext
        return
    server = EphemeralApi(timeout)
    server.spawn()  # first: it starts while Prefect and the pipeline are imported
    try:
        if _configured_api():
            server.stop()
            yield nullcontext
        else:
            yield server.use
    finally:
        server.stop()
