"""onnxruntime's HQQ or GPTQ int4 quantizer over the model builder's fp32 graph.

Run as (the export stage does, in a subprocess: the quantizer holds the whole graph):
    python -m slmflow.stages.quantize_main hqq FP32_DIR OUT_DIR --block-size 32
    python -m slmflow.stages.quantize_main gptq FP32_DIR OUT_DIR --block-size 32 \
        --calibration PROMPTS.json

Every MatMul with a constant weight becomes MatMulNBits (4 bits, blocks of `--block-size` along
the input dimension), and the embedding table GatherBlockQuantized (round-to-nearest int4, as in
the builder's int4 export). HQQ needs
no data. GPTQ runs the graph over the calibration prompts (token ids of training rows: the
prompt as the fine-tune saw it) with an empty KV cache. The builder's other files
(genai_config.json, tokenizer) are copied as they are: the fp32 graph's inputs and outputs are
the int4 graph's on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any


def quantize_command(cfg: Any, fp32: Path, out: Path, data: Any) -> list[str]:
    """The command the export stage runs (`cfg`: an ExportConfig with quantizer hqq or gptq)."""
    cmd = [sys.executable, "-m", "slmflow.stages.quantize_main", cfg.quantizer, str(fp32), str(out),
           "--block-size", str(cfg.block_size or 32)]
    if cfg.quantizer == "gptq":
        from slmflow.folders import read_split
        from slmflow.sensitivity import calibration_rows

        rows = calibration_rows(read_split(data, "train"), cfg.calibration_rows)
        prompts = fp32 / "calibration.json"
        prompts.write_text(json.dumps([r["prompt"] for r in rows]))
        cmd += ["--calibration", str(prompts)]
    return cmd


class PromptReader:
    """onnxruntime's CalibrationDataReader over prompts: one row a sample, empty KV cache."""

    def __init__(self, folder: Path, prompts: list[str]) -> None:
        import numpy as np
        from transformers import AutoTokenizer

        config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        names = config["inputs"]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        empty = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
        self.items = []
        for prompt in prompts:
            ids = np.array([tokenizer(prompt)["input_ids"]], dtype=np.int64)
            feed = {names["input_ids"]: ids, names["attention_mask"]: np.ones_like(ids)}
            for layer in range(config["num_hidden_layers"]):
                feed[names["past_key_names"] % layer] = empty
                feed[names["past_value_names"] % layer] = empty
            self.items.append(feed)
        self.rewind()

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.items)

    def __iter__(self):  # what onnxruntime's GPTQ reads it with
        return iter(self.items)


def quantize(method: str, fp32: Path, out: Path, block_size: int,
             prompts: list[str] | None = None) -> None:
    import onnx
    import onnx.external_data_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model_file = fp32 / "model.onnx"
    if method == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
        quantizer = MatMulNBitsQuantizer(onnx.load(model_file), block_size=block_size,
                                         algo_config=algo)
    else:
        algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=PromptReader(fp32, prompts or []),
                                         block_size=block_size)
        quantizer = MatMulNBitsQuantizer(str(model_file), block_size=block_size, algo_config=algo)
        os.chdir(fp32)  # GPTQ loads the graph from bytes: its external data is found from here
    quantizer.process()
    model = quantizer.model.model
    # GPTQ leaves the weights it did not change pointing into the fp32 file: read them in, so
    # the int4 folder holds all its data in its own file.
    onnx.external_data_helper.load_external_data_for_model(model, str(fp32))
    # The embedding table as the builder's int4 export has it (round-to-nearest int4 along the
    # hidden axis, GatherBlockQuantized): else it stays fp32, the biggest tensor of a small model.
    embeddings = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                      op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    embeddings.process()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # onnx refuses to write external data where a file of its name exists (cwd)
    for item in sorted(fp32.iterdir()):
        if item.is_file() and not item.name.startswith("model.onnx") and item.name != "calibration.json":
            shutil.copy2(item, out / item.name)
    embeddings.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slmflow.stages.quantize_main")
    parser.add_argument("method", choices=("hqq", "gptq"))
    parser.add_argument("fp32", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--calibration", type=Path)
    args = parser.parse_args(argv)
    prompts = json.loads(args.calibration.read_text()) if args.calibration else None
    if args.method == "gptq" and not prompts:
        parser.error("gptq needs --calibration PROMPTS.json (a list of prompt strings)")
    quantize(args.method, args.fp32.resolve(), args.out.resolve(), args.block_size, prompts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
