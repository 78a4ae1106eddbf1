"""Child processes that end with the run that started them, however the run ends.

Every process a run starts (the temporary Prefect API, the export's builder and quantizer, the
fine-tune's torchrun) goes through `spawn`: it runs `python -m slmflow.lifeline -- COMMAND`, a
small watcher that starts COMMAND and waits for either of two things:

- COMMAND ends: the watcher exits with its status (a signal is re-raised on itself), so the
  caller sees what it would see with COMMAND as its direct child;
- the run's process ends, any way (SIGKILL and the OOM killer included): the watcher sends
  SIGTERM to its process group (COMMAND and whatever COMMAND started, e.g. torchrun's ranks),
  then SIGKILL to what is left after `--grace` seconds (default 5).

Why a watcher, not PR_SET_PDEATHSIG alone: the kernel sends the parent-death signal when the
*thread* that forked the child exits, not the process. slmflow starts children from Prefect's
task threads and the recipe search's ThreadPoolExecutor, and a child must not die with a thread
that merely ended (nor outlive a process whose thread lived on). The watcher waits on a pidfd of
the run's process (Linux >= 5.3; elsewhere it polls `getppid()` twice a second), which turns
readable only when the whole process has exited. It forks COMMAND from its own only thread, so
PR_SET_PDEATHSIG there is exact: if the watcher itself is killed, COMMAND gets SIGTERM.
`spawn` puts the watcher in a new session: a terminal's Ctrl-C reaches only the run, which then
stops its children in order (`stop`: SIGTERM to the group, SIGKILL after a grace period), e.g.
the Prefect API only after the flow has recorded its end there.

`die_with_parent()` is the plain request, for processes whose parent is single-threaded
(torchrun's ranks). Small on purpose: this module imports nothing of slmflow and starts in
tens of milliseconds.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

_live: set[subprocess.Popen] = set()  # what `spawn` started and `stop` has not ended yet
_live_lock = threading.Lock()


def _deathsig_request(sig: int):
    """A function that has `sig` sent to the calling process when its parent (thread) dies
    (Linux PR_SET_PDEATHSIG; elsewhere a no-op). Loaded here, so calling it imports nothing."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return lambda: None

    def request() -> None:
        parent = os.getppid()
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), sig)

    return request


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have `sig` sent to this process when its parent (thread) dies (Linux; elsewhere a no-op)."""
    _deathsig_request(sig)()


def command(cmd: Sequence[str], sig: str = "TERM", grace: float = 5.0) -> list[str]:
    """`cmd`, run under the watcher: it ends when the process that starts it ends."""
    return [sys.executable, "-m", "slmflow.lifeline", "--signal", sig, "--grace", str(grace),
            "--", *cmd]


def spawn(cmd: Sequence[str], sig: str = "TERM", **popen: Any) -> subprocess.Popen:
    """Start `cmd` under the watcher, in a new session (its own process group); `stop` ends it."""
    proc = subprocess.Popen(command(cmd, sig), start_new_session=True, **popen)
    with _live_lock:
        _live.add(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End `proc` and every process of its group (what it started), politely first: SIGTERM
    to the watcher, which passes it to COMMAND and waits for it; SIGKILL to the whole group
    after `grace` seconds, or at once when the watcher has ended (COMMAND's leftovers)."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    with _live_lock:
        _live.discard(proc)


def stop_all(grace: float = 10.0) -> None:
    """`stop` every child `spawn` started that is still running (an interrupted run)."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        stop(proc, grace)


def run(cmd: Sequence[str], timeout: float | None = None, **popen: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` with `cmd` under the watcher: on any
    exit from here (an error, Ctrl-C, a timeout) the command and its group are stopped."""
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


# --------------------------------------------------------------------------------------------
# The watcher (`python -m slmflow.lifeline`)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        return None


def _end_group(child: subprocess.Popen, sig: int, grace: float) -> None:
    """The run is gone: `sig` to COMMAND and its group, SIGKILL to what is left after `grace`."""
    leader = os.getpgrp() == os.getpid()  # our own group (spawn): safe to signal as a whole
    signal.signal(sig, signal.SIG_IGN)
    try:
        if leader:
            os.killpg(0, sig)
        else:
            child.send_signal(sig)
    except ProcessLookupError:
        pass
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    if leader:
        os.killpg(0, signal.SIGKILL)  # ourselves included: nothing of the run is left
    child.kill()


def watch(argv: list[str], sig: int, grace: float) -> int:
    parent = os.getppid()
    parent_fd = _pidfd(parent)
    if os.getppid() != parent:  # the run ended before we could watch it
        return 128 + sig
    # One thread here: preexec_fn is safe, and the death signal follows this process exactly.
    child = subprocess.Popen(argv, preexec_fn=_deathsig_request(sig))  # noqa: PLW1509
    for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(forwarded, lambda signum, _frame: child.send_signal(signum))
    child_fd = _pidfd(child.pid)
    while child.poll() is None:
        if parent_fd is not None and child_fd is not None:
            ready, _, _ = select.select([parent_fd, child_fd], [], [], 5.0)
            parent_gone = parent_fd in ready or os.getppid() != parent
        else:
            try:
                child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            parent_gone = os.getppid() != parent
        if parent_gone and child.poll() is None:
            _end_group(child, sig, grace)
            return 128 + sig
    code = child.returncode
    if code < 0:  # ended by a signal: end the same way, so the caller sees what COMMAND did
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def main(argv: list[str]) -> int:
    sig, grace = signal.SIGTERM, 5.0
    while argv[:1] in (["--signal"], ["--grace"]):
        if argv[0] == "--signal":
            sig = getattr(signal, "SIG" + argv[1])
        else:
            grace = float(argv[1])
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m slmflow.lifeline [--signal TERM] [--grace 5] -- COMMAND ...",
              file=sys.stderr)
        return 2
    return watch(argv, sig, grace)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
