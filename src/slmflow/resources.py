"""Memory and disk a stage needs, what the machine has, and an early stop when it lacks them.

Merge and export load a whole model in full precision; on a machine that cannot hold it they would
run for minutes and then die (the kernel's OOM killer leaves no message) or fill the disk halfway
through a save. `check_resources` runs at the start of those stages, before anything is loaded,
and stops with one line: what the stage needs, what is available, and the fix.

The estimates are deliberately coarse (a factor × the fp32 size of the model, from the parameter
count in the safetensors headers); set SLMFLOW_SKIP_RESOURCE_CHECK=1 to run anyway.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from slmflow.errors import ResourceError

SKIP_ENV = "SLMFLOW_SKIP_RESOURCE_CHECK"
FP32 = 4  # bytes per parameter

# Exported weights, bytes per parameter. int4: 0.5 for the packed weights plus block scales,
# k_quant_mixed's int8 layers and the unquantized embeddings (SmolLM2-135M int4 measured 0.87);
# int8: 1 plus the same overheads; fp16/fp32: the weights as they are.
EXPORT_BYTES_PER_PARAM = {"int4": 1.0, "int8": 1.5, "fp16": 2.0, "fp32": 4.0}


def available_memory_bytes() -> int:
    """Memory a new allocation can get without swapping: MemAvailable, capped by a cgroup limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:  # not Linux (or an old kernel): free physical pages
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown: do not block the run
    try:  # a container's cgroup v2 limit is what the OOM killer enforces
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return available


def free_disk_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    probe = Path(path).expanduser().resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def estimate_merge(params: int) -> tuple[int, int]:
    """(memory, disk) in bytes to merge an adapter into a model of `params` parameters.

    Memory ~2.5x the fp32 size: the fp32 base with the adapter attached (1x), the logits check on a
    few prompts and the merged copy's conversion and save buffers (up to another 1.5x; merge.dtype
    float32 keeps the copy in place, a 16-bit dtype adds 0.5x). Disk: the merged model, at most
    its fp32 size.
    """
    fp32 = FP32 * params
    return int(2.5 * fp32), fp32


def estimate_export(params: int, precision: str) -> tuple[int, int]:
    """(memory, disk) in bytes for onnxruntime-genai's builder to export `params` parameters.

    Memory ~3x the fp32 size: the builder loads the whole model (1x), builds the ONNX graph with
    its own copy of the weights (1x) and quantizes layer by layer into a third buffer. Disk: its
    temporary files in the builder cache (up to the fp32 size) plus the exported model
    (EXPORT_BYTES_PER_PARAM by precision).
    """
    fp32 = FP32 * params
    out = int(EXPORT_BYTES_PER_PARAM.get(precision, FP32) * params)
    return 3 * fp32, fp32 + out


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def check_resources(stage: str, need_mem: int, need_disk: int, where: str | Path) -> None:
    """Raise ResourceError when the machine has less memory or less disk at `where` than needed."""
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0", "false"):
        return
    problems, fixes = [], []
    mem = available_memory_bytes()
    if mem < need_mem:
        problems.append(f"about {_gib(need_mem)} of memory, {_gib(mem)} available")
        fixes.append("free memory (stop other jobs) or fine-tune a smaller model")
    disk = free_disk_bytes(where)
    if disk < need_disk:
        problems.append(f"about {_gib(need_disk)} of disk, {_gib(disk)} free at {where}")
        fixes.append("free disk there or set cache_dir to a folder with more room")
        if stage == "export":
            fixes.append("or export a smaller model (export.precision int4)")
    if problems:
        raise ResourceError(
            f"{stage}: needs {' and '.join(problems)}; {'; '.join(fixes)} "
            f"(or set {SKIP_ENV}=1 to try anyway)"
        )
