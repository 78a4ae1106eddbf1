"""onnxruntime-genai's model builder, with onnxruntime's CPU k-quant done in slices on every core.

Run as (the export stage does, in a subprocess):
    python -m slmflow.stages.builder_main -i MERGED -o OUT -p int4 -e cpu -c CACHE --extra_options ...

The arguments are the builder's own. Why a wrapper: onnxruntime's k-quant
(`quant_tensor_k_quant_cpu`, what `algo_config=k_quant*` runs on CPU) quantizes a whole weight
in one go on one core, holding ~10 full-size float temporaries; for SmolLM2's 49152x576 LM head
that is ~1 GB on top of the model, the peak of the whole export. Every block of `group_size`
values is quantized on its own (all its reductions run along a block), so quantizing slices of
blocks gives the same bytes, in any order and on any thread: `tests/unit/test_builder_main.py`
compares both on random weights and through the builder on the tiny model.

The slices run on a pool of threads: the k-quant is whole-array numpy, which releases the GIL in
its loops, and each thread writes its result straight into the output arrays, so what a slice
holds beyond the output is freed as it ends. Threads: $SLMFLOW_QUANT_WORKERS (the export
stage sets it from `export.quantize_workers`), else the cores this process may run on, lowered
so that every thread's temporaries fit in half the memory available.
"""

from __future__ import annotations

import atexit
import math
import os
import runpy
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROWS = 1 << 16  # most blocks a slice: 65536 x 32 float32 = 8 MB a temporary
MIN_ROWS = 1 << 11  # fewest blocks a slice cut for parallelism (per-call overhead below it)
WORKERS_ENV = "SLMFLOW_QUANT_WORKERS"
# Bytes a slice's k-quant holds per value at its peak, its float64 result included (tracemalloc
# on a 65536-block slice, onnxruntime 1.32: 34.6), with a margin.
SLICE_BYTES_PER_VALUE = 40


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # a taskset or cpuset narrows it
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def quant_workers(group_size: int = 32) -> int:
    """Threads for the k-quant: $SLMFLOW_QUANT_WORKERS, else cores and free memory decide."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if raw:
        try:
            workers = int(raw)
        except ValueError:
            workers = 0
        if workers < 1:
            raise SystemExit(f"{WORKERS_ENV}={raw!r}: give a whole number of threads, 1 or more")
        return workers
    from slmflow.resources import available_memory_bytes

    per_worker = ROWS * group_size * SLICE_BYTES_PER_VALUE
    by_memory = max(1, (available_memory_bytes() // 2) // per_worker)
    return int(min(usable_cores(), by_memory))


def _slices(data: np.ndarray, group_size: int, workers: int) -> list[np.ndarray]:
    """Views of `data`, each whole blocks in order: at most ROWS blocks, and at least `workers`
    slices when the weight has MIN_ROWS blocks a worker."""
    total = data.size // group_size
    target = min(ROWS, max(MIN_ROWS, math.ceil(total / workers)))
    if data.ndim == 2 and data.shape[1] % group_size == 0:
        # Whole rows of blocks, sliced before the reshape: the builder passes a transposed
        # weight, which the reshape would otherwise copy whole.
        step = max(1, target // (data.shape[1] // group_size))
        return [data[r : r + step] for r in range(0, data.shape[0], step)]
    blocks = np.reshape(data, (-1, group_size))
    return [blocks[b : b + target] for b in range(0, len(blocks), target)]


def chunked(quantize, workers: int | None = None):
    """`quantize(data, num_bits, group_size) -> (q, scale, zero_point)`, in slices of blocks on
    `workers` threads (None: `quant_workers()` at the first call)."""
    chosen: list[int] = [workers] if workers else []
    pool: list[ThreadPoolExecutor] = []  # made at the first weight worth splitting, then reused

    def quantize_in_slices(data, num_bits=4, group_size=32):
        started = time.perf_counter()
        try:
            return _quantize(data, num_bits, group_size)
        finally:
            spent[0] += time.perf_counter() - started
            spent[1] += 1

    def _quantize(data, num_bits, group_size):
        data = np.asarray(data)
        if not chosen:
            chosen.append(quant_workers(group_size))
        count = chosen[0]
        slices = _slices(data, group_size, count)
        if len(slices) == 1:
            return quantize(data, num_bits, group_size)
        starts = np.cumsum([0] + [s.size // group_size for s in slices[:-1]]).tolist()
        out: list[np.ndarray] = []
        made = threading.Lock()

        def one(index: int) -> None:
            part = quantize(slices[index], num_bits, group_size)
            with made:  # the output takes its dtypes from the first slice to end
                if not out:
                    total = data.size // group_size
                    out.extend(np.empty((total, *p.shape[1:]), dtype=p.dtype) for p in part)
            start = starts[index]
            for whole, piece in zip(out, part, strict=True):  # disjoint rows: no lock needed
                whole[start : start + len(piece)] = piece

        if count == 1:
            for index in range(len(slices)):
                one(index)
        else:
            if not pool:
                pool.append(ThreadPoolExecutor(max_workers=count, thread_name_prefix="k-quant"))
            for done in [pool[0].submit(one, i) for i in range(len(slices))]:
                done.result()  # re-raises a slice's error
        return tuple(out)

    spent = [0.0, 0]  # seconds in the k-quant, weights quantized (the stage log shows them)
    quantize_in_slices.__wrapped__ = quantize
    quantize_in_slices.spent = spent
    quantize_in_slices.threads = chosen
    return quantize_in_slices


def patch() -> bool:
    """Swap onnxruntime's CPU k-quant for the sliced one; False if this onnxruntime has none."""
    try:
        from onnxruntime.quantization.neural_compressor import weight_only
    except ImportError:
        return False
    original = getattr(weight_only, "quant_tensor_k_quant_cpu", None)
    if original is None or hasattr(original, "__wrapped__"):
        return original is not None
    weight_only.quant_tensor_k_quant_cpu = chunked(original)
    return True


def main() -> None:
    if patch():
        from onnxruntime.quantization.neural_compressor import weight_only

        atexit.register(_say_spent, weight_only.quant_tensor_k_quant_cpu)
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


def _say_spent(quantize) -> None:
    seconds, weights = quantize.spent
    if weights:
        print(f"slmflow k-quant: {weights} weights in {seconds:.1f} s on {quantize.threads[0]} "
              "thread(s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
