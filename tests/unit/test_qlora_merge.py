"""QLoRA on the tiny Phi-3: the two merge bases against the trained model (4-bit base + adapter),
the trained model evaluated as its own row, and the config that refuses a base LoRA cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmflow.artifacts import ArtifactRef
from slmflow.config import MergeConfig
from slmflow.stage import Workspace

QUANT = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
PROMPTS = ["### Text: I lost my keys again\n### The tone is:\n",
           "### Text: What a lovely surprise party\n### The tone is:\n",
           "### Text: The storm outside scares me\n### The tone is:\n"]


def _ref(kind: str, uri: Path, **meta) -> ArtifactRef:
    return ArtifactRef(kind=kind, uri=str(uri), sha256="0" * 64, key="k", meta=meta)


@pytest.fixture(scope="module")
def qlora_parts(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """(base, adapter, data) references: an adapter on the 4-bit tiny Phi-3 whose B is not zero
    (peft's random init for both matrices), so merging it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from slmflow.qlora import load_4bit

    root = tmp_path_factory.mktemp("qlora")
    torch.manual_seed(0)
    model = get_peft_model(load_4bit(tiny_model, QUANT, "cpu"), LoraConfig(
        r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM"))
    model.save_pretrained(root / "adapter")
    (root / "data").mkdir()
    rows = [{"text": p + "Sad", "prompt": p, "label": "Sad", "line": i} for i, p in enumerate(PROMPTS)]
    (root / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return (_ref("base_model", root / "base", external_model_dir=str(tiny_model)),
            _ref("adapter", root / "adapter"), _ref("dataset", root / "data"))


def _merge(parts, tmp_path: Path, **cfg) -> dict:
    from slmflow.stages import merge

    base, adapter, data = parts
    out = tmp_path / "out"
    out.mkdir(parents=True)
    ws = Workspace(out, tmp_path / "work", log=lambda m: None)
    return merge.build(MergeConfig(**cfg), ws, base=base, adapter=adapter, data=data,
                       trust_remote_code=False, quantization=QUANT)


@pytest.fixture(scope="module")
def merges(qlora_parts, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """The merge stage run once per base: base_weights -> (its meta, the written model folder)."""
    root = tmp_path_factory.mktemp("merges")
    return {form: (_merge(qlora_parts, root / form, base_weights=form, check_prompts=3),
                   root / form / "out" / "model") for form in ("dequantized", "original")}


def _trained_logits(parts, folder: Path | None = None):
    """Logits of the check prompts: of the trained model, or of a merged model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmflow.qlora import load_trained

    base, adapter, _ = parts
    tiny = Path(base.meta["external_model_dir"])
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = (load_trained(tiny, adapter.path, QUANT, "cpu") if folder is None else
             AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits for p in PROMPTS[:3]]


def test_the_two_merge_bases_give_different_models_and_the_check_reports_both(qlora_parts, merges):
    meta, folder = merges["dequantized"]
    forms = meta["forms"]
    dequantized = forms["dequantized"]["vs_trained"]["max_logit_diff"]
    original = forms["original"]["vs_trained"]["max_logit_diff"]
    assert meta["base_weights"] == "dequantized"
    assert meta["max_logit_diff_vs_trained"] == dequantized
    # the dequantized base is the trained model; the original weights are another model
    assert dequantized < 1e-3
    assert original > 100 * max(dequantized, 1e-6)
    assert forms["original"]["vs_trained"]["mean_logit_diff"] > forms["dequantized"]["vs_trained"]["mean_logit_diff"]
    for form in forms.values():  # each merge is exact against its own unmerged model
        assert form["merge_exactness"] < 1e-3
    # what was written is the dequantized form: the trained model's logits
    written = _trained_logits(qlora_parts, folder)
    trained = _trained_logits(qlora_parts)
    assert max(float((w - t).abs().max()) for w, t in zip(written, trained)) < 1e-3


def test_merge_into_original_writes_the_original_form(qlora_parts, merges):
    meta, folder = merges["original"]
    assert meta["base_weights"] == "original"
    assert meta["max_logit_diff_vs_trained"] == meta["forms"]["original"]["vs_trained"]["max_logit_diff"]
    assert meta["forms"] == merges["dequantized"][0]["forms"]  # both measured either way
    written = _trained_logits(qlora_parts, folder)
    trained = _trained_logits(qlora_parts)
    assert max(float((w - t).abs().max()) for w, t in zip(written, trained)) > 1e-3


def test_a_dequantized_merge_past_the_tolerance_fails(qlora_parts, tmp_path):
    from slmflow.errors import StageCheckError

    with pytest.raises(StageCheckError, match=r"merge\.tolerance=1e-12"):
        _merge(qlora_parts, tmp_path, base_weights="dequantized", check_prompts=1, tolerance=1e-12)


def test_the_trained_model_is_evaluated_as_trained(qlora_parts, merges):
    """The evaluation of an adapter loads it on the 4-bit base: its label scores are those of
    the dequantized merge (the same model), not of the merge into the original weights."""
    from slmflow.generate import label_probabilities, load_backend, torch_backend

    base, adapter, _ = qlora_parts
    with pytest.raises(ValueError, match="quantization="):
        load_backend(adapter)
    labels = ["Sad", "Joy", "Fear", "Surprise"]
    trained = load_backend(adapter, base=base, quantization=QUANT)
    prompts = [trained.tokenizer(p)["input_ids"] for p in PROMPTS]
    scores = {"trained": label_probabilities(trained, prompts, labels)}
    for form, (_, folder) in merges.items():
        scores[form] = label_probabilities(torch_backend(folder), prompts, labels)

    def gap(a, b):
        return max(abs(x[k] - y[k]) for x, y in zip(scores[a], scores[b]) for k in labels)

    assert gap("trained", "dequantized") < 1e-4
    assert gap("trained", "original") > 100 * max(gap("trained", "dequantized"), 1e-7)


def test_dequantized_base_needs_qlora():
    from slmflow.configio import build_config
    from slmflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"merge\.base_weights: dequantized needs finetune\.method=qlora"):
        build_config({"merge": {"base_weights": "dequantized"}})
    cfg = build_config({"finetune": {"method": "qlora"}, "merge": {"base_weights": "dequantized"}})
    assert cfg.merge.base_weights == "dequantized"


def test_lora_merge_keys_did_not_change_and_qlora_ones_name_the_base():
    from slmflow.stages.merge import key_config

    cfg = MergeConfig()
    assert key_config(cfg) == {"dtype": "float32", "tolerance": 1e-3, "check_prompts": 4}
    auto = key_config(cfg, quantization=QUANT)
    assert auto["base_weights"] == "original" and auto["quantization"] == QUANT  # measured default
    assert key_config(MergeConfig(base_weights="original"), quantization=QUANT) == auto
    assert key_config(MergeConfig(base_weights="dequantized"), quantization=QUANT) != auto
