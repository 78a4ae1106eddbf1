"""Benchmark: the default run inside a hard memory limit, side by side with the same run without one.

Answers "does it fit in a 3 GB box?" directly: the run (the flow, the Prefect server, the model
builder: its whole process tree) is put in a memory cgroup whose limit is LIMIT, with no swap, so
the kernel must keep everything it cannot drop (heap, tensors) under LIMIT and reclaims file pages
(shared libraries, memory-mapped model files) as needed; going over is an OOM kill. Prints, for
the run without a limit and the run within it: exit, wall time, per-stage seconds, accuracy, the
peak the kernel charged to the cgroup, and the tree's peak RSS and anonymous memory.

Needs a writable cgroup memory controller (v1 `memory` or v2 `memory.max`; root in a container
usually has one); says so and exits 2 otherwise.

Run as:
    .venv/bin/python -m bench.memory_limit [--limit 3G] [--no-prefect] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Self

from bench.common import table, write_result
from bench.default_run import run_once

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


class MemoryCgroup:
    """A fresh memory cgroup (v1 or v2) below the one this process is in, removed on exit."""

    def __init__(self, limit: int, name: str = "slmflow-bench"):
        self.limit = limit
        self.v2 = not V1.is_dir() and (V2 / "cgroup.controllers").is_file()
        own = self._own()
        self.path = (V2 if self.v2 else V1) / own.lstrip("/") / f"{name}-{os.getpid()}"

    def _own(self) -> str:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            num, controllers, path = line.split(":", 2)
            if (self.v2 and num == "0") or (not self.v2 and "memory" in controllers.split(",")):
                return path
        raise RuntimeError("this process is in no memory cgroup")

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def __enter__(self) -> Self:
        self.path.mkdir()
        if self.v2:
            self._write("memory.max", str(self.limit))
            if (self.path / "memory.swap.max").exists():
                self._write("memory.swap.max", "0")
        else:
            self._write("memory.limit_in_bytes", str(self.limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                self._write("memory.memsw.limit_in_bytes", str(self.limit))
        return self

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` started inside the cgroup (its children stay in it)."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd]

    def peak(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        path = self.path / name
        return int(path.read_text()) if path.exists() else -1

    def oom_kills(self) -> int:
        if self.v2:
            events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
            return int(events.get("oom_kill", 0))
        control = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return int(control.get("oom_kill", 0))

    def __exit__(self, *exc: object) -> None:
        self.path.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", default="3G", help="memory limit of the run's process tree")
    parser.add_argument("--no-prefect", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    limit = parse_size(args.limit)
    try:
        with MemoryCgroup(limit):
            pass
    except (OSError, RuntimeError) as exc:
        sys.exit(f"bench.memory_limit: no writable memory cgroup here ({exc}); run it as root on a "
                 "machine with the cgroup memory controller")
    root = Path(tempfile.mkdtemp(prefix="slmflow-bench-mem-"))
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    extra = ["--no-prefect"] if args.no_prefect else []
    free = run_once(root / "free", args.overrides, extra, env, check=False)
    with MemoryCgroup(limit) as cg:
        limited = run_once(root / "limited", args.overrides, extra, env, wrap=cg.wrap, check=False)
        limited["cgroup_peak_mb"] = round(cg.peak() / 2**20)
        limited["oom_kills"] = cg.oom_kills()
    shutil.rmtree(root, ignore_errors=True)

    rows = [["exit", free["exit"], limited["exit"]],
            ["wall seconds", free["wall_seconds"], limited["wall_seconds"]]]
    rows += [[f"  {stage}", free["stages"].get(stage), limited["stages"].get(stage)]
             for stage in free["stages"]]
    rows += [["accuracy merged / exported",
              f'{free["accuracy"].get("merged")} / {free["accuracy"].get("exported")}',
              f'{limited["accuracy"].get("merged")} / {limited["accuracy"].get("exported")}'],
             ["cgroup peak charged MB", None, limited["cgroup_peak_mb"]],
             ["OOM kills", None, limited["oom_kills"]]]
    rows += [[f"peak {kind.upper()} MB (tree)", free["peak_mb"][kind], limited["peak_mb"][kind]]
             for kind in ("rss", "anon")]
    mode = "plain" if args.no_prefect else "Prefect"
    print(f"default run ({mode}) without a limit vs within {args.limit} (no swap)")
    print(table(["", "no limit", f"limit {args.limit}"], rows))
    write_result("memory_limit" + ("_plain" if args.no_prefect else ""),
                 {"mode": mode, "limit_bytes": limit, "overrides": args.overrides,
                  "no_limit": free, "limited": limited})
    sys.exit(0 if limited["exit"] in (0, 1) and not limited["oom_kills"] else 1)


if __name__ == "__main__":
    main()
