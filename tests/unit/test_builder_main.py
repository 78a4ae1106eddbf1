"""The export's builder wrapper: k-quant in slices of blocks, on one thread or several, gives the
same bytes as onnxruntime's whole-tensor k-quant, with a bounded peak."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slmflow.stages import builder_main

weight_only = pytest.importorskip("onnxruntime.quantization.neural_compressor.weight_only")


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 7])  # blocks a slice: several slices, a ragged last one
@pytest.mark.parametrize("shape", [(96, 40), (40, 48)])  # whole rows of blocks; blocks across rows
def test_sliced_k_quant_equals_whole(monkeypatch, num_bits, rows, shape, workers):
    monkeypatch.setattr(builder_main, "ROWS", rows)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape).astype(np.float32)  # (in, out) as the builder's MatMul
    weight[:32, 3] = 0.25  # a constant block (rmin == rmax) takes the other branch
    original = weight_only.quant_tensor_k_quant_cpu
    whole = original(weight.T, num_bits, 32)
    sliced = builder_main.chunked(original, workers)(weight.T, num_bits, 32)
    assert len(whole) == len(sliced) == 3
    for a, b in zip(whole, sliced, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def test_parallel_slices_split_every_weight_and_match_serial(monkeypatch):
    # MIN_ROWS as shipped: SmolLM2's smallest k-quantized weight (576x576, 10368 blocks) is cut
    # in two for two threads; the bytes are those of one thread and of the whole tensor.
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((576, 576)).astype(np.float32)
    assert len(builder_main._slices(weight.T, 32, 2)) == 2
    assert len(builder_main._slices(weight.T, 32, 1)) == 1
    assert len(builder_main._slices(weight[:64].T, 32, 4)) == 1  # too small to be worth cutting
    original = weight_only.quant_tensor_k_quant_cpu
    serial = builder_main.chunked(original, 1)(weight.T, 4, 32)
    parallel = builder_main.chunked(original, 4)(weight.T, 4, 32)
    whole = original(weight.T, 4, 32)
    for a, b, c in zip(serial, parallel, whole, strict=True):
        assert a.tobytes() == b.tobytes() == c.tobytes()


def test_parallel_peak_is_the_output_plus_a_slice_a_thread(monkeypatch):
    # 8192 blocks in slices of 512 on 2 threads: the peak is the output and two slices'
    # temporaries, not the ~10 full-size temporaries of the whole-tensor k-quant.
    import tracemalloc

    monkeypatch.setattr(builder_main, "ROWS", 512)
    monkeypatch.setattr(builder_main, "MIN_ROWS", 1)
    weight = np.random.default_rng(2).standard_normal((512, 512)).astype(np.float32)
    original = weight_only.quant_tensor_k_quant_cpu
    quantize = builder_main.chunked(original, 2)

    def peak(fn) -> tuple[int, int]:
        tracemalloc.start()
        try:
            out = fn(weight.T, 4, 32)
            return tracemalloc.get_traced_memory()[1], sum(a.nbytes for a in out)
        finally:
            tracemalloc.stop()

    whole_peak, out_bytes = peak(original)
    sliced_peak, _ = peak(quantize)
    slice_values = 512 * 32
    # Two threads' slices, and one more: a finished slice's temporaries can still be alive
    # when its thread starts the next (seen on CI: 3.51 MB against a 2-slice bound of 3.48 MB).
    assert sliced_peak < out_bytes + 3 * slice_values * builder_main.SLICE_BYTES_PER_VALUE
    assert sliced_peak < whole_peak / 2


def test_worker_count_from_env_cores_and_memory(monkeypatch):
    from slmflow import resources

    monkeypatch.delenv(builder_main.WORKERS_ENV, raising=False)
    monkeypatch.setattr(builder_main, "usable_cores", lambda: 6)
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 64 << 30)
    assert builder_main.quant_workers() == 6
    per_worker = builder_main.ROWS * 32 * builder_main.SLICE_BYTES_PER_VALUE
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 2 * 2 * per_worker)
    assert builder_main.quant_workers() == 2  # half the free memory holds two threads' slices
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 0)
    assert builder_main.quant_workers() == 1
    monkeypatch.setenv(builder_main.WORKERS_ENV, "3")
    assert builder_main.quant_workers() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv(builder_main.WORKERS_ENV, bad)
        with pytest.raises(SystemExit, match="SLMFLOW_QUANT_WORKERS=.*whole number of threads"):
            builder_main.quant_workers()


def test_patch_swaps_onnxruntime_function_once(monkeypatch):
    original = weight_only.quant_tensor_k_quant_cpu
    monkeypatch.setattr(weight_only, "quant_tensor_k_quant_cpu", original)
    assert builder_main.patch()
    patched = weight_only.quant_tensor_k_quant_cpu
    assert patched is not original and patched.__wrapped__ is original
    assert builder_main.patch()  # twice: still one layer
    assert weight_only.quant_tensor_k_quant_cpu is patched


def _export(cmd: list[str], model: Path, out: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    args = ["-i", str(model), "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out.parent / "cache"),
            "--extra_options", "hf_token=false", "algo_config=k_quant_mixed"]  # fmt: skip
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=out.parent, check=False,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}


@pytest.mark.slow
def test_export_through_wrapper_is_byte_identical(tiny_model, tmp_path):
    # Slices of 8 blocks: every k-quantized weight of the tiny model is cut into several, which
    # one thread and then three quantize; both give the builder's own bytes.
    code = "from slmflow.stages import builder_main as b; b.ROWS = 8; b.MIN_ROWS = 1; b.main()"
    wrapped = [sys.executable, "-c", code]
    plain = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    hashes = {}
    for name, cmd, workers in (("serial", wrapped, "1"), ("parallel", wrapped, "3"), ("plain", plain, "")):
        (tmp_path / name).mkdir()
        hashes[name] = _export(cmd, tiny_model, tmp_path / name / "out",
                               {builder_main.WORKERS_ENV: workers})
    assert "model.onnx.data" in hashes["serial"]
    assert hashes["serial"] == hashes["parallel"] == hashes["plain"]


def test_thread_count_is_no_part_of_the_export_key_and_reaches_the_builder():
    from slmflow.config import ExportConfig
    from slmflow.stages import export

    assert export.key_config(ExportConfig(quantize_workers=2)) == export.key_config(ExportConfig())
    assert "quantize_workers" not in export.key_config(ExportConfig())
    assert export.quantize_env(ExportConfig(quantize_workers=3)) == {builder_main.WORKERS_ENV: "3"}
    assert export.quantize_env(ExportConfig()) == {}  # builder_main decides


def test_a_bad_thread_count_is_refused_by_the_config():
    from slmflow.configio import build_config
    from slmflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"export\.quantize_workers: Input should be greater than or equal to 1"):
        build_config({"export": {"quantize_workers": 0}})
