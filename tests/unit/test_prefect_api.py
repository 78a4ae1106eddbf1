"""`slmflow run`'s temporary Prefect API: started early, used by the flow, stopped after."""

from __future__ import annotations

import socket
from contextlib import nullcontext

from slmflow.prefect_api import EphemeralApi, ephemeral_api


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_temporary_api_serves_the_flow_and_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @flow
    def hello() -> str:
        return PREFECT_API_URL.value()

    # No API configured, whatever earlier tests in this process left in Prefect's settings.
    with temporary_settings(restore_defaults={PREFECT_API_URL}), ephemeral_api(120) as api:
        assert api is not nullcontext
        with api():
            url = PREFECT_API_URL.value()
            assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
            assert hello() == url
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs()
            assert [r.state.type.value for r in runs] == ["COMPLETED"]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert not _port_open(port)
    assert (tmp_path / "prefect-home" / "prefect.db").exists()


def test_configured_api_is_used_and_nothing_spawned(monkeypatch):
    spawned = []
    monkeypatch.setattr(EphemeralApi, "spawn", lambda self: spawned.append(self))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with ephemeral_api(5) as api:
        assert api is nullcontext
    assert spawned == []


def test_api_from_a_profile_stops_the_early_one(monkeypatch, tmp_path):
    from slmflow import prefect_api

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(prefect_api, "_configured_api", lambda: "http://127.0.0.1:9/api")
    started = []
    real_spawn = EphemeralApi.spawn
    monkeypatch.setattr(EphemeralApi, "spawn", lambda self: (real_spawn(self), started.append(self)))
    with ephemeral_api(5) as api:
        assert api is nullcontext
        assert started[0].proc.poll() is not None  # stopped before the flow runs


def test_a_server_left_by_a_killed_run_is_stopped_and_not_used(tmp_path, monkeypatch, capsys):
    """A temporary API that outlived its run (as before slmflow.lifeline) in the same
    PREFECT_HOME: the next run stops it and serves the flow from its own server."""
    import signal
    import subprocess
    import sys

    from slmflow import prefect_api

    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # as `slmflow run` sets it
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = prefect_api.run_owner(dead.pid)  # a run that has exited
    dead.wait()
    old = EphemeralApi(120)
    with monkeypatch.context() as patched:
        patched.setattr(prefect_api, "run_owner", lambda pid=None: owner)
        old.spawn()
    leftover = old.proc.pid
    try:
        old.wait()  # up and serving, as a killed run's server was
        server = next(pid for pid, _ in prefect_api.leftover_servers(prefect_api.prefect_home()))
        assert server != leftover  # the server itself, not the watcher that started it
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(restore_defaults={PREFECT_API_URL}), ephemeral_api(120) as api:
            assert f"stopped a temporary Prefect API (pid {server})" in capsys.readouterr().err
            assert not _port_open(old.port)
            with api():
                from prefect.client.orchestration import get_client

                with get_client(sync_client=True) as client:
                    assert client.read_flow_runs() == []  # the same database, nothing tripped
                assert PREFECT_API_URL.value() != old.url
        assert old.proc.wait(timeout=10) == -signal.SIGTERM  # its watcher ended as the server did
    finally:
        old.stop()
