"""Helpers shared by the benchmarks: machine load, peak memory sampling, tables, JSON results.

Benchmarks print their figures side by side with a baseline measured in the same run, and write
them to bench/results/NAME.json (git-ignored). The machine is small and shared: every result
records the load average before and after it was measured.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (as `uptime` prints them)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average": load_average(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class PeakRss:
    """Samples the memory of a process tree (this process or a pid, and its children).

    The peak is the largest sum over the tree at one sample (every 0.1 s by default), which is
    what the machine has to hold at once; a child that lives less than a sample can be missed.
    Two sums, each with its own peak: RSS (counts a shared library once per process that maps it,
    and a memory-mapped model file's pages, which the kernel can drop and read again) and
    anonymous memory (heap and tensors: what must fit in RAM; there is no swap). Both come from
    /proc/PID/status, which costs microseconds; smaps_rollup (for PSS) costs ~25 ms a read on a
    2 GB process, and sampling it 10 times a second slowed the run it measured by ~10%.
    """

    KINDS = ("rss", "anon")

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.peaks = dict.fromkeys(self.KINDS, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _status(pid: int) -> dict[str, int]:
        fields = {"VmRSS": "rss", "RssAnon": "anon"}
        out = dict.fromkeys(PeakRss.KINDS, 0)
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in fields:
                        out[fields[key]] = int(value.split()[0]) * 1024
        except OSError:
            pass
        return out

    def sample(self) -> dict[str, int]:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return dict.fromkeys(self.KINDS, 0)
        total = dict.fromkeys(self.KINDS, 0)
        for p in procs:
            for kind, value in self._status(p.pid).items():
                total[kind] += value
        return total

    def _update(self, sample: dict[str, int]) -> None:
        for kind in self.KINDS:
            self.peaks[kind] = max(self.peaks[kind], sample[kind])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._update(self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self.peaks = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def peak(self) -> int:
        return self.peaks["rss"]

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 0)

    def peaks_mb(self) -> dict[str, float]:
        return {kind: round(v / 2**20, 0) for kind, v in self.peaks.items()}


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table, first column left-aligned, the rest right-aligned."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write bench/results/NAME.json with the machine and load average added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    print(f"wrote {path.relative_to(REPO)}")
    return path


def dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
