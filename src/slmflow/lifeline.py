"""Run a command that dies with the process that started it.

`python -m slmflow.lifeline [--signal TERM] -- COMMAND ...` asks the kernel (Linux
PR_SET_PDEATHSIG) to send the signal to this process when its parent dies, then becomes COMMAND
(the request survives exec). A run killed any way, SIGKILL and the OOM killer included, then
leaves no child working on: the fine-tune's torchrun, and through it its ranks. Elsewhere than
Linux it only runs COMMAND.

Small on purpose: it imports nothing of slmflow, so it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have `sig` sent to this process when its parent dies (Linux; elsewhere a no-op)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    parent = os.getppid()
    libc.prctl(1, sig)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def command(cmd: list[str], sig: str = "TERM") -> list[str]:
    """`cmd`, started so that it dies with its parent."""
    return [sys.executable, "-m", "slmflow.lifeline", "--signal", sig, "--", *cmd]


def main(argv: list[str]) -> int:
    sig = signal.SIGTERM
    if argv[:1] == ["--signal"]:
        sig, argv = getattr(signal, "SIG" + argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m slmflow.lifeline [--signal TERM] -- COMMAND ...", file=sys.stderr)
        return 2
    die_with_parent(sig)
    os.execvp(argv[0], argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
