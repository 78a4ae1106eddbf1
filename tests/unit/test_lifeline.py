"""`slmflow.lifeline`: children end with the run's process (not with the thread that started
them), their status passes through, `stop` ends a child's whole group; and a temporary Prefect
API left by a killed run is found and stopped, while a live run's is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmflow import lifeline
from slmflow.prefect_api import APP, OWNER_ENV, leftover_servers, prefect_home, stop_leftovers

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _run_process(code: str) -> subprocess.Popen:
    """A stand-in for `slmflow run`: a Python process running `code`, printing on stdout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


def test_child_outlives_the_thread_that_started_it_and_dies_with_the_process(proctable):
    # The child is started from a thread that then ends (as a Prefect task thread or a recipe
    # search worker can): PR_SET_PDEATHSIG alone would kill it there. It must live on, and end
    # when the process is SIGKILLed.
    code = (
        "import sys, threading, time\n"
        "from slmflow import lifeline\n"
        f"t = threading.Thread(target=lambda: lifeline.spawn({SLEEPER!r}))\n"
        "t.start(); t.join()\n"
        "print('thread ended', flush=True)\n"
        "time.sleep(600)\n"
    )
    run = _run_process(code)
    try:
        assert run.stdout.readline().strip() == "thread ended"
        deadline = time.monotonic() + 30
        while len(below := proctable.descendants(run.pid)) < 2:  # the watcher and the sleeper
            assert time.monotonic() < deadline, below
            time.sleep(0.05)
        time.sleep(0.5)  # a parent-death signal tied to the thread would have fired by now
        assert proctable.alive(below) == below
        assert any("time.sleep(600)" in proctable.cmdline(pid) for pid, _ in below)
        run.send_signal(signal.SIGKILL)
        run.wait()
        left, seconds = proctable.wait_gone(below, within=15)
        print(f"lifeline: children gone {seconds:.2f} s after SIGKILL of their run")
        assert left == {}, left
    finally:
        run.kill()
        run.wait()


def test_status_and_output_pass_through():
    ok = lifeline.run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"])
    assert (ok.returncode, ok.stdout) == (3, "out\n")
    killed = lifeline.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    assert killed.returncode == -signal.SIGTERM
    assert lifeline._live == set()


def test_stop_ends_the_command_and_what_it_started(proctable, tmp_path):
    # The command starts a grandchild in its group (as torchrun starts ranks) and ignores SIGTERM.
    code = ("import signal, subprocess, sys, time\n"
            f"subprocess.Popen({SLEEPER!r})\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('up', flush=True)\n"
            "time.sleep(600)\n")
    proc = lifeline.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        below = proctable.descendants(proc.pid) | {(proc.pid, proctable._stat(proc.pid)[2])}
        assert len(below) == 3
        started = time.monotonic()
        lifeline.stop(proc, grace=1)
        assert time.monotonic() - started < 10
        left, _ = proctable.wait_gone(below, within=5)
        assert left == {}, left
    finally:
        lifeline.stop(proc, grace=0)


def test_watcher_passes_a_signal_on_and_ends_like_its_command(proctable):
    proc = lifeline.spawn(SLEEPER)
    try:
        deadline = time.monotonic() + 30
        while not proctable.descendants(proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # to the watcher only, as `terminate()` does
        assert proc.wait(timeout=15) == -signal.SIGTERM
    finally:
        lifeline.stop(proc, grace=0)


# --------------------------------------------------------------------------------------------
# Leftover temporary Prefect APIs


def _dead_owner(home: str) -> str:
    """An owner mark naming a run that has exited."""
    from slmflow.prefect_api import _stat

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    start = _stat(proc.pid)[2]
    proc.communicate(b"")
    return f"{proc.pid}:{start}:{home}"


def _fake_server(home: Path, owner: str | None) -> subprocess.Popen:
    """A process that looks like a temporary Prefect API of `home` (command line, environment)."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT__SERVER_EPHEMERAL": "1"}
    env.pop(OWNER_ENV, None)
    if owner:
        env[OWNER_ENV] = owner
    return subprocess.Popen([*SLEEPER, "--factory", APP], env=env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_runs_server_is_stopped_a_live_runs_is_not(tmp_path, monkeypatch):
    from slmflow.prefect_api import run_owner

    home, other = tmp_path / "home", tmp_path / "other"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    mine = prefect_home()
    servers = {
        "dead owner": _fake_server(home, _dead_owner(mine)),
        "live owner": _fake_server(home, run_owner()),  # this process: a run still going
        "other home": _fake_server(other, _dead_owner(prefect_home({"PREFECT_HOME": str(other)}))),
    }
    try:
        deadline = time.monotonic() + 30
        while APP not in Path(f"/proc/{servers['other home'].pid}/cmdline").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [pid for pid, _ in leftover_servers(mine)] == [servers["dead owner"].pid]
        started = time.monotonic()
        assert stop_leftovers(mine) == [servers["dead owner"].pid]
        assert servers["dead owner"].wait(timeout=10) == -signal.SIGTERM
        print(f"leftover API stopped in {time.monotonic() - started:.2f} s")
        assert servers["live owner"].poll() is None and servers["other home"].poll() is None
        assert leftover_servers(mine) == []
    finally:
        for proc in servers.values():
            proc.kill()
            proc.wait()


def test_ctrl_c_during_a_parallel_recipe_search_stops_the_running_builders(proctable):
    # Candidates run in worker threads; Ctrl-C reaches the main thread only. Their builders
    # (sleepers here) are stopped, so the search ends now, not when the builders would have.
    code = (
        "import sys, types\n"
        "from slmflow import lifeline, recipes\n"
        "def candidate(name):\n"
        "    sys.stdout.write(name + '\\n'); sys.stdout.flush()  # one write: threads don't interleave\n"
        f"    return {{'rc': lifeline.run({SLEEPER!r}).returncode}}\n"
        "recipes.run_search(types.SimpleNamespace(candidates=['a', 'b', 'c']), candidate, 2)\n"
    )
    run = _run_process(code)
    try:
        assert sorted([run.stdout.readline().strip(), run.stdout.readline().strip()]) == ["a", "b"]
        deadline = time.monotonic() + 30
        while True:
            below = proctable.descendants(run.pid)
            lines = [proctable.cmdline(p) for p, _ in below]
            if sum("time.sleep(600)" in x and "slmflow.lifeline" not in x for x in lines) == 2:
                break
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == -signal.SIGINT  # KeyboardInterrupt, not 600 s of sleep
        assert run.stdout.read() == ""  # candidate c never started
        left, _ = proctable.wait_gone(below, within=5)
        assert left == {}, left
    finally:
        run.kill()
        run.wait()
