"""The export's builder wrapper: k-quant a slice of blocks at a time gives the same bytes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slmflow.stages import builder_main

weight_only = pytest.importorskip("onnxruntime.quantization.neural_compressor.weight_only")


@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 7])  # blocks a slice: several slices, a ragged last one
@pytest.mark.parametrize("shape", [(96, 40), (40, 48)])  # whole rows of blocks; blocks across rows
def test_sliced_k_quant_equals_whole(monkeypatch, num_bits, rows, shape):
    monkeypatch.setattr(builder_main, "ROWS", rows)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape).astype(np.float32)  # (in, out) as the builder's MatMul
    weight[:32, 3] = 0.25  # a constant block (rmin == rmax) takes the other branch
    original = weight_only.quant_tensor_k_quant_cpu
    whole = original(weight.T, num_bits, 32)
    sliced = builder_main.chunked(original)(weight.T, num_bits, 32)
    assert len(whole) == len(sliced) == 3
    for a, b in zip(whole, sliced, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def test_patch_swaps_onnxruntime_function_once(monkeypatch):
    original = weight_only.quant_tensor_k_quant_cpu
    monkeypatch.setattr(weight_only, "quant_tensor_k_quant_cpu", original)
    assert builder_main.patch()
    patched = weight_only.quant_tensor_k_quant_cpu
    assert patched is not original and patched.__wrapped__ is original
    assert builder_main.patch()  # twice: still one layer
    assert weight_only.quant_tensor_k_quant_cpu is patched


def _export(cmd: list[str], model: Path, out: Path) -> dict[str, str]:
    args = ["-i", str(model), "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out.parent / "cache"),
            "--extra_options", "hf_token=false", "algo_config=k_quant_mixed"]  # fmt: skip
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=out.parent, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}


@pytest.mark.slow
def test_export_through_wrapper_is_byte_identical(tiny_model, tmp_path):
    # Slices of 8 blocks: every k-quantized weight of the tiny model is cut into several.
    wrapped = [sys.executable, "-c",
               "import sys; from slmflow.stages import builder_main as b; b.ROWS = 8; b.main()"]  # fmt: skip
    plain = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours = _export(wrapped, tiny_model, tmp_path / "a" / "out")
    theirs = _export(plain, tiny_model, tmp_path / "b" / "out")
    assert "model.onnx.data" in ours
    assert ours == theirs
