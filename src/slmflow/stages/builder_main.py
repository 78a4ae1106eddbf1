"""onnxruntime-genai's model builder, with onnxruntime's CPU k-quant done a slice of rows at a time.

Run as (the export stage does, in a subprocess):
    python -m slmflow.stages.builder_main -i MERGED -o OUT -p int4 -e cpu -c CACHE --extra_options ...

The arguments are the builder's own. Why a wrapper: onnxruntime's k-quant
(`quant_tensor_k_quant_cpu`, what `algo_config=k_quant*` runs on CPU) quantizes a whole weight
in one go, holding ~10 full-size float temporaries; for SmolLM2's 49152x576 LM head that is ~1 GB
on top of the model, the peak of the whole export. Every block of `group_size` values is
quantized on its own (all its reductions run along a block), so quantizing a slice of blocks at a
time gives the same bytes: `tests/unit/test_builder_main.py` compares both on random weights,
and the export of the default model is byte-identical with and without it.
"""

from __future__ import annotations

import runpy
import sys

import numpy as np

ROWS = 1 << 16  # blocks per slice: 65536 x 32 float32 = 8 MB a temporary


def chunked(quantize):
    """`quantize(data, num_bits, group_size) -> (q, scale, zero_point)`, a slice of blocks at a time."""

    def quantize_in_slices(data, num_bits=4, group_size=32):
        data = np.asarray(data)
        if data.ndim == 2 and data.shape[1] % group_size == 0:
            # Whole rows of blocks, sliced before the reshape: the builder passes a transposed
            # weight, which the reshape would otherwise copy whole.
            per_row = data.shape[1] // group_size
            step = max(1, ROWS // per_row)
            slices = [data[r : r + step] for r in range(0, data.shape[0], step)]
        else:
            blocks = np.reshape(data, (-1, group_size))
            slices = [blocks[b : b + ROWS] for b in range(0, len(blocks), ROWS)]
        if len(slices) == 1:
            return quantize(data, num_bits, group_size)
        out, start = None, 0
        for piece_in in slices:
            part = quantize(piece_in, num_bits, group_size)
            if out is None:  # filled in place: no second full-size copy from a concatenate
                total = data.size // group_size
                out = tuple(np.empty((total, *p.shape[1:]), dtype=p.dtype) for p in part)
            for whole, piece in zip(out, part, strict=True):
                whole[start : start + len(piece)] = piece
            start += len(part[0])
        return out

    quantize_in_slices.__wrapped__ = quantize
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
    patch()
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
