"""Shared fixtures: the tiny Phi-3 (built once per session) and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session", autouse=True)
def cache_per_output_folder():
    """No test writes to the user's shared stage cache (~/.cache/slmflow): every run keeps its
    cache in OUTPUT_DIR/cache (the layout tests were written for), subprocesses included. Tests of
    the shared cache set SLMFLOW_CACHE (or cache_dir) to a folder of their own."""
    import os

    before = os.environ.get("SLMFLOW_CACHE")
    os.environ["SLMFLOW_CACHE"] = "{output_dir}/cache"
    yield
    if before is None:
        os.environ.pop("SLMFLOW_CACHE", None)
    else:
        os.environ["SLMFLOW_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Phi-3 with a locally trained tokenizer (deterministic, ~3 s)."""
    from slmflow.tiny import build_tiny_phi3

    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "tiny-phi3", seed=0)


@pytest.fixture
def write_jsonl(tmp_path: Path):
    """Write rows (dicts or raw strings) to a .jsonl file under tmp_path."""

    def write(rows: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write



class ProcessTable:
    """This user's processes, read from /proc (Linux): who descends from whom, who is left."""

    @staticmethod
    def _stat(pid: int) -> tuple[str, int, str] | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return fields[0], int(fields[1]), fields[19]  # state, parent pid, start time

    def processes(self) -> dict[tuple[int, str], int]:
        """(pid, start time) -> parent pid of every living process."""
        found = {}
        for entry in Path("/proc").glob("[0-9]*"):
            stat = self._stat(int(entry.name))
            if stat and stat[0] != "Z":
                found[(int(entry.name), stat[2])] = stat[1]
        return found

    def descendants(self, pid: int) -> set[tuple[int, str]]:
        """(pid, start time) of every living process below `pid`."""
        table = self.processes()
        children: dict[int, list[tuple[int, str]]] = {}
        for proc, parent in table.items():
            children.setdefault(parent, []).append(proc)
        found, todo = set(), [pid]
        while todo:
            for proc in children.get(todo.pop(), []):
                found.add(proc)
                todo.append(proc[0])
        return found

    def alive(self, procs: set[tuple[int, str]]) -> set[tuple[int, str]]:
        return procs & set(self.processes())

    def mentioning(self, text: str) -> set[tuple[int, str]]:
        """Living processes whose command line or environment holds `text`."""
        found = set()
        for proc in self.processes():
            try:
                blob = Path(f"/proc/{proc[0]}/cmdline").read_bytes() + Path(
                    f"/proc/{proc[0]}/environ").read_bytes()
            except OSError:
                continue
            if text.encode() in blob:
                found.add(proc)
        return found

    @staticmethod
    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    def wait_gone(self, procs: set[tuple[int, str]], within: float = 15.0, text: str | None = None):
        """Wait until none of `procs` (nor any process mentioning `text`) lives; (what is left,
        seconds waited). `self.last`: the command lines of the last to go."""
        import time

        started, names, previous = time.monotonic(), {}, set()
        while True:
            left = self.alive(procs) | (self.mentioning(text) if text else set())
            if not left or time.monotonic() - started > within:
                self.last = sorted(names.get(p, "?")[:80] for p in previous) if not left else []
                return {p: self.cmdline(p[0]) for p in left}, time.monotonic() - started
            names.update({p: self.cmdline(p[0]) for p in left if p not in names})
            previous = left
            time.sleep(0.05)


@pytest.fixture
def proctable() -> ProcessTable:
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("reads the process table from /proc (Linux)")
    return ProcessTable()
