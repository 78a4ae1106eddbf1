"""`export.recipe: auto` on the tiny Phi-3 through Prefect, on a situation the test constructs.

What the search does with its inputs is the subject here, not what accuracy a random-init model
reaches on this CPU (that moves with the machine: merged 0.500 on one, 0.484 on another). So:

- one candidate is broken on purpose: the export of `int4_rtn_b128` gets its int4 LM head's
  scales zeroed before the stage hashes it, so every logit is exactly 0.0 on any CPU, the model
  answers its first vocabulary entry (EOS) and scores 0 on every row;
- the gate is computed from the accuracies the run measured: `evaluate.max_accuracy_drop` =
  merged minus the lowest intact candidate, so every intact candidate holds it exactly and the
  broken one (0.0) cannot, whatever the floats did.

Sizes on disk follow from the tensor shapes and bit widths alone (RTN block 128 < block 32 <
k_quant_mixed, which keeps some MatMuls in int8), so "smallest" is the same everywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slmflow.configio import load_config
from slmflow.errors import QualityGateError

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
BROKEN = "int4_rtn_b128"
CANDIDATES = [BROKEN, "int4_rtn_b32", "int4_k_quant_mixed"]


def _config(tiny_model: Path, out: Path, candidates: list[str], *more: str):
    return load_config(REPO / "configs" / "tiny-phi3_lora_cpu.yaml", [
        f"model.name_or_path={tiny_model}", f"output_dir={out}",
        "data.eval_file=pkg:slmflow/data/tones_small.jsonl", "export.recipe=auto",
        f"export.search.candidates=[{', '.join(candidates)}]", *more])


def silence_int4_lm_head(folder: Path) -> bool:
    """Zero the scales of a block-128 int4 LM head in an exported folder (in place).

    MatMulNBits dequantizes each weight as (q - zero_point) * scale: with every scale 0 the
    logits are exact zeros, so greedy decoding picks token 0 on any CPU. Other exports are left
    alone. True when this folder was changed.
    """
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    names = {t.name: t for t in graph.initializer}
    if "lm_head.MatMul.weight_Q4G128" not in names:
        return False
    scale = names["lm_head.MatMul.weight_scale"]
    where = {e.key: e.value for e in scale.external_data}
    data = folder / where["location"]
    blob = bytearray(data.read_bytes())
    offset, length = int(where["offset"]), int(where["length"])
    blob[offset:offset + length] = bytes(length)
    data.unlink()  # a new file: never write through a hard link into another folder
    data.write_bytes(bytes(blob))
    return True


@pytest.fixture(scope="module")
def broken_export():
    """Every export of this module's runs passes through `silence_int4_lm_head` after the
    builder wrote it and before the stage hashes it (the export stage's own load-and-generate
    check is the seam: it is the first thing to read the folder)."""
    from slmflow.stages import export

    original = export.smoke_generate
    silenced: list[Path] = []

    def smoke_after_damage(folder: Path, prompt: str, max_new_tokens: int = 4) -> str:
        if silence_int4_lm_head(folder):
            silenced.append(folder)
        return original(folder, prompt, max_new_tokens)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "smoke_generate", smoke_after_damage)
        yield silenced


@pytest.fixture(scope="module")
def measured(prefect_api, tiny_model, broken_export, tmp_path_factory):
    """First run, gate wide open (1.0): every candidate exported (two at a time) and evaluated."""
    from flows.pipeline import slmflow_pipeline

    out = tmp_path_factory.mktemp("recipes")
    config = _config(tiny_model, out / "open", CANDIDATES, "evaluate.max_accuracy_drop=1.0",
                     "export.search.max_parallel=2", f"cache_dir={out / 'cache'}")
    report = json.loads(Path(slmflow_pipeline(config)).read_text())
    assert len(broken_export) == 1, broken_export  # only the block-128 export was damaged
    search = report["export_search"]
    accuracy = {c["recipe"]: c["accuracy"] for c in search["candidates"]}
    intact = min(a for name, a in accuracy.items() if name != BROKEN)
    merged = search["merged_accuracy"]
    # The one condition the verdicts below rest on: the fine-tune taught the model something
    # (64 training rows; ~0.5 here) and the intact int4 copies answer some rows right.
    assert accuracy[BROKEN] == 0.0 and min(merged, intact) > 0, (merged, accuracy)
    drop = max(0.0, merged - intact)  # every intact candidate holds it; 0.0 cannot
    return out, report, drop


@pytest.fixture(scope="module")
def gated(measured, tiny_model):
    """Second run, gate from the measurements: cached exports, the broken candidate below it."""
    from flows.pipeline import slmflow_pipeline

    out, _, drop = measured
    config = _config(tiny_model, out / "gated", CANDIDATES, f"evaluate.max_accuracy_drop={drop!r}",
                     "export.search.max_parallel=2", f"cache_dir={out / 'cache'}")
    path = Path(slmflow_pipeline(config))
    return json.loads(path.read_text()), path


def test_with_every_candidate_within_the_gate_the_smallest_wins(measured):
    _, report, _ = measured
    search = report["export_search"]
    assert {c["recipe"]: c["verdict"] for c in search["candidates"]} == dict.fromkeys(
        CANDIDATES, "passed")
    sizes = {c["recipe"]: c["size_bytes"] for c in search["candidates"]}
    assert sizes[BROKEN] < sizes["int4_rtn_b32"] < sizes["int4_k_quant_mixed"], sizes
    assert search["chosen"] == BROKEN  # within a gate of 1.0 even a silent model passes


def test_auto_keeps_the_smallest_candidate_within_the_gate(gated, measured):
    report, path = gated
    search = report["export_search"]
    verdicts = {c["recipe"]: c["verdict"] for c in search["candidates"]}
    assert verdicts == {BROKEN: "below gate", "int4_rtn_b32": "passed",
                        "int4_k_quant_mixed": "passed"}, search["candidates"]
    assert search["min_accuracy"] == pytest.approx(search["merged_accuracy"] - measured[2])
    assert search["chosen"] == "int4_rtn_b32"  # the smaller of the two within the gate
    chosen = next(c for c in search["candidates"] if c["recipe"] == "int4_rtn_b32")
    # the published model and the report's "exported" row are the chosen candidate
    assert report["models"]["exported"]["accuracy"] == chosen["accuracy"]
    assert Path(report["exported_model_dir"], "model.onnx").read_bytes() == Path(
        chosen["onnx_uri"], "model.onnx").read_bytes()
    manifest = json.loads((Path(report["exported_model_dir"]) / "manifest.json").read_text())
    assert manifest["builder_options"]["algo_config"] == "rtn"
    assert manifest["builder_options"]["block_size"] == "32"
    assert report["quality_gate"]["passed"]
    for name in CANDIDATES:  # each candidate is its own stage result, built by the first run
        assert report["stages"][f"export[{name}]"]["cached"] is True
        assert f"evaluate_exported[{name}]" in report["stages"]
    for c in search["candidates"]:
        assert c["size_bytes"] > 0 and 0 <= c["accuracy"] <= 1 and c["latency_ms_p95"] >= c["latency_ms_p50"]
    md = (path.parent / "report.md").read_text()
    assert "## Export recipe search" in md and "chosen (smallest within the gate)" in md
    assert "![recipe search](recipe_search.svg)" in md
    svg = (path.parent / "recipe_search.svg").read_text()
    assert svg.startswith("<svg") and "Pareto front" in svg


def test_changing_the_objective_exports_nothing_again(gated, measured, tiny_model):
    from flows.pipeline import run_pipeline, run_plain

    out, _, drop = measured
    config = _config(tiny_model, out / "fastest", CANDIDATES, "export.search.objective=fastest",
                     f"evaluate.max_accuracy_drop={drop!r}", f"cache_dir={out / 'cache'}")
    report = json.loads(run_pipeline(config, run_plain).read_text())
    for name in CANDIDATES:
        assert report["stages"][f"export[{name}]"]["cached"] is True
        assert report["stages"][f"evaluate_exported[{name}]"]["cached"] is True
    search = report["export_search"]
    assert search["objective"] == "fastest"
    passed = [c for c in search["candidates"] if c["verdict"] == "passed"]
    assert {c["recipe"] for c in passed} == {"int4_rtn_b32", "int4_k_quant_mixed"}
    # the lower p50 of the two within the gate (latency is this machine's: read, not assumed)
    fastest = min(passed, key=lambda c: (c["latency_ms_p50"], -c["accuracy"], c["recipe"]))
    assert search["chosen"] == fastest["recipe"]


def test_no_candidate_within_the_gate_fails_listing_them(gated, measured, tiny_model):
    from flows.pipeline import run_pipeline, run_plain

    out, _, drop = measured
    merged = gated[0]["export_search"]["merged_accuracy"]
    config = _config(tiny_model, out / "none", [BROKEN], f"evaluate.max_accuracy_drop={drop!r}",
                     f"cache_dir={out / 'cache'}")
    with pytest.raises(QualityGateError, match=re.escape(
            f"recipe search: no candidate holds the quality gate (accuracy >= "
            f"{round(merged - drop, 6):.4f} = merged {merged:.4f} - evaluate.max_accuracy_drop): "
            f"{BROKEN} 0.0000; add int8/fp16")):
        run_pipeline(config, run_plain)
    report = json.loads((out / "none" / "report.json").read_text())  # kept, with the search
    assert report["export_search"]["chosen"] is None
    assert report["quality_gate"]["passed"] is False


def test_with_a_validation_split_the_search_chooses_on_it_and_no_reported_set(measured, tiny_model):
    from flows.pipeline import run_pipeline, run_plain

    out = measured[0]
    config = _config(tiny_model, out / "validation", ["int4_rtn_b32", "int4_k_quant_mixed"],
                     "data.validation_split=0.25", "evaluate.max_accuracy_drop=1.0",
                     f"cache_dir={out / 'cache'}")
    path = run_pipeline(config, run_plain)
    report = json.loads(path.read_text())
    search, stages = report["export_search"], report["stages"]
    assert search["chosen_on"] == "validation" and search["chosen"] == "int4_rtn_b32"
    for name in ("int4_rtn_b32", "int4_k_quant_mixed"):  # candidates judged on validation rows only
        assert f"evaluate_exported[{name}][validation]" in stages
        assert f"evaluate_exported[{name}]" not in stages
    folder = Path(stages["prepare_data"]["uri"])
    lines = {split: {json.loads(row)["line"]
                     for row in (folder / f"{split}.jsonl").read_text().splitlines()}
             for split in ("train", "validation")}
    assert lines["validation"] and not lines["train"] & lines["validation"]
    validation = report["sets"]["validation"]["models"]
    assert validation["merged"]["split"] == validation["exported"]["split"] == "validation"
    assert validation["exported"]["n"] == report["data"]["validation"]["rows"] == len(lines["validation"])
    assert report["models"]["exported"]["split"] == "eval"  # the published model, on the eval split
    assert report["selection"]["recipe_chosen_on"] == "validation"
    assert report["selection"]["gate_judged_on"] == "eval"
    md = (path.parent / "report.md").read_text()
    assert "Judged on validation" in md and "the export recipe was chosen on validation" in md
    assert (path.parent / "recipe_search_kl.svg").read_text().startswith("<svg")
