"""Phi-3-mini's real widths (hidden 3072, 32 heads, intermediate 8192, vocab 32064) in 2 random
layers, through the whole pipeline: QLoRA on CPU bitsandbytes → merge → int4 export → evaluate.

Bugs tied to dimensions (one was: the builder mis-built a model whose intermediate size equals
its vocabulary size) show here, not in a user's first GPU run. Not in `make test` (about 1.7 GB
of weights, minutes on 2 cores): `pytest -m realdims tests/e2e/test_real_dims.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.realdims


def test_phi3_mini_widths_go_through_qlora_merge_int4_and_evaluation(tmp_path):
    from flows.pipeline import run_pipeline, run_plain
    from slmflow.configio import load_config
    from slmflow.tiny import SHAPES, build_tiny_phi3

    model = build_tiny_phi3(tmp_path / "phi3-mini-2l", seed=0, shape="phi3-mini", layers=2)
    config = load_config(REPO / "configs" / "tiny-phi3_qlora_cpu.yaml", [
        f"model.name_or_path={model}", f"output_dir={tmp_path / 'run'}", "finetune.max_steps=4",
        "finetune.batch_size=8", "evaluate.limit=8"])
    report = json.loads(run_pipeline(config, run_plain).read_text())

    dims = json.loads((Path(report["merged_model_dir"]) / "config.json").read_text())
    assert {k: dims[k] for k in ("hidden_size", "intermediate_size", "vocab_size")} == {
        k: SHAPES["phi3-mini"][k] for k in ("hidden_size", "intermediate_size", "vocab_size")}
    assert report["training"]["method"] == "qlora" and report["training"]["steps"] == 4
    assert report["merge"]["max_logit_diff"] < 1e-3
    genai = json.loads((Path(report["exported_model_dir"]) / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["hidden_size"] == 3072
    assert report["models"]["exported"]["n"] == 8  # the int4 model loads and answers every row
