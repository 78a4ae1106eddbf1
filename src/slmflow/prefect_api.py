"""A throwaway Prefect API for one `slmflow run` with no server configured, started early.

Prefect starts its own ephemeral API only when the flow first calls it: it imports the server's
code into the run's process (~1.5 s here), then spawns the server and waits for it (3 s; 7.4 s on
a new database, which is migrated first). `ephemeral_api()` spawns the same server (Prefect's
app in its ephemeral mode: UI off, 127.0.0.1, a free port, the database in PREFECT_HOME) as soon
as the config is valid, so it starts while the run imports its own code, and stops it when the
run ends. Where an API is configured (PREFECT_API_URL in the environment, a profile or a settings
file), nothing is spawned, or the spawned one is stopped unused.

The server runs under `slmflow.lifeline`: it ends with the run, however the run ends (SIGKILL
and the OOM killer included), and a terminal's Ctrl-C reaches only the run, which stops the
server after the flow has recorded its end there. Its environment names the run that owns it
(`SLMFLOW_API_OWNER`: pid, start time, PREFECT_HOME), so a run finds and stops a temporary API
that an earlier, killed run left in the same PREFECT_HOME (one from before the watcher, or
whatever else outlived its run) instead of leaving it to hold its port and memory; it never
connects to one. Servers of live runs, and anything that is not a temporary Prefect API, are
left alone.
"""

from __future__ import annotations

import os
import signal
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

from slmflow import lifeline

OWNER_ENV = "SLMFLOW_API_OWNER"  # PID:START_TIME:PREFECT_HOME of the run a temporary API serves
APP = "prefect.server.api.server:create_app"


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
        if self.proc is not None:  # a server that exited (its port was taken): its watcher too
            lifeline.stop(self.proc)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app_dir = Path(find_spec("prefect").origin).parent.parent  # as Prefect's own ephemeral
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1", OWNER_ENV: run_owner()}  # fmt: skip
        env.pop("PREFECT_API_URL", None)
        self.proc = lifeline.spawn(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             APP, "--host", "127.0.0.1", "--port", str(self.port),
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
        if self.proc:
            lifeline.stop(self.proc, grace=5)


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
        for pid in stop_leftovers(prefect_home()):
            print(f"slmflow: stopped a temporary Prefect API (pid {pid}) that a killed run left "
                  f"in {prefect_home()}", file=sys.stderr, flush=True)
        if _configured_api():
            server.stop()
            yield nullcontext
        else:
            yield server.use
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# Leftovers of killed runs (Linux: read from /proc; elsewhere none are found)


def prefect_home(environ: dict[str, str] | os._Environ = os.environ) -> str:
    return str(Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser().resolve())


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time in clock ticks) of a process, or None if there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), fields[19]


def _alive(pid: int, start: str) -> bool:
    found = _stat(pid)
    return found is not None and found[0] != "Z" and found[2] == start


def run_owner(pid: int | None = None) -> str:
    """This run's mark on the servers it starts: pid, start time, PREFECT_HOME."""
    pid = os.getpid() if pid is None else pid
    found = _stat(pid)
    return f"{pid}:{found[2] if found else ''}:{prefect_home()}"


def leftover_servers(home: str) -> list[tuple[int, str]]:
    """(pid, start time) of this user's temporary Prefect APIs in PREFECT_HOME `home` whose run
    is gone: marked by a run that has exited, or unmarked (Prefect's own, an older slmflow's)
    and orphaned (re-parented to init)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            # the server itself: not its watcher, whose command line holds the server's
            if entry.stat().st_uid != os.getuid() or APP.encode() not in argv or b"slmflow.lifeline" in argv:
                continue
            env = dict(item.split("=", 1) for item in
                       (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
        except OSError:
            continue
        pid, stat = int(entry.name), _stat(int(entry.name))
        if stat is None or env.get("PREFECT__SERVER_EPHEMERAL") != "1":
            continue
        owner = env.get(OWNER_ENV)
        if owner:
            owner_pid, owner_start, owner_home = owner.split(":", 2)
            if owner_home != home or _alive(int(owner_pid), owner_start):
                continue
        elif prefect_home(env) != home or stat[1] != 1:
            continue
        found.append((pid, stat[2]))
    return found


def stop_leftovers(home: str, grace: float = 5.0) -> list[int]:
    """Stop the leftover temporary APIs of `home` (SIGTERM, SIGKILL after `grace`); their pids."""
    left = leftover_servers(home)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while any(_alive(*p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, start in left:
        if _alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return [pid for pid, _ in left]
