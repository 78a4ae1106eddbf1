"""The export recipe search (`export.recipe: auto`): candidates, choice, Pareto front, failures."""

from __future__ import annotations

import threading

import pytest

from slmflow import recipes
from slmflow.artifacts import ArtifactRef
from slmflow.config import (
    ALL_RECIPES,
    SEPARATE_REFUSALS,
    ExportConfig,
    PipelineConfig,
    RecipeSearchConfig,
)
from slmflow.configio import build_config
from slmflow.errors import ConfigError
from slmflow.stages.export import STAGE, builder_options
from slmflow.store import Store


def _ref(kind: str, key: str, **meta) -> ArtifactRef:
    return ArtifactRef(kind=kind, uri=f"/store/{kind}/{key}", sha256=key * 4, key=key, meta=meta)


def _record(name, size_mb, acc, merged=0.9, drop=0.02, p50=10.0):
    onnx = _ref("onnx_model", name, size_bytes=int(size_mb * 2**20))
    ev = _ref("evaluation", name + "e", accuracy=acc, macro_f1=acc, latency_ms_p50=p50,
              latency_ms_p95=p50 * 2)
    return recipes.candidate_record(name, onnx, ev, merged, drop)


def test_every_recipe_name_has_builder_settings():
    assert set(recipes.RECIPES) == set(ALL_RECIPES)
    assert RecipeSearchConfig().candidates == [r for r in ALL_RECIPES
                                               if r not in ("int4_gptq", "int4_hqq")]
    for name in ALL_RECIPES:  # each builds a valid export config
        ExportConfig.model_validate(recipes.candidate_config(ExportConfig(), name).model_dump())


def test_candidate_shares_the_folder_of_the_same_manual_recipe(tmp_path):
    merged, data = _ref("merged_model", "m"), _ref("dataset", "d")
    store = Store.at(tmp_path)

    def onnx_key(cfg: ExportConfig) -> str:
        return STAGE.key(cfg, store, merged=merged, data=data)

    manual = ExportConfig()  # int4 k_quant, the default
    auto = ExportConfig(recipe="auto", search=RecipeSearchConfig(objective="fastest"))
    candidate = recipes.candidate_config(auto, "int4_k_quant")
    assert onnx_key(candidate) == onnx_key(manual)
    rtn = recipes.candidate_config(auto, "int4_rtn_b64")
    assert builder_options(rtn)["algo_config"] == "rtn" and builder_options(rtn)["block_size"] == "64"
    assert onnx_key(rtn) != onnx_key(manual)
    assert recipes.candidate_config(auto, "fp16").precision == "fp16"
    cuda = recipes.candidate_config(ExportConfig(execution_provider="cuda"), "int8")
    assert cuda.execution_provider == "cuda"


def test_choice_is_the_smallest_or_fastest_within_the_gate():
    records = [_record("int4_rtn_b32", 80, 0.85, p50=9), _record("int4_k_quant_mixed", 110, 0.90, p50=12),
               _record("int8", 180, 0.905, p50=8), _record("fp16", 270, 0.90, p50=15)]
    assert [r["verdict"] for r in records] == ["below gate", "passed", "passed", "passed"]
    assert recipes.choose(records, "smallest")["recipe"] == "int4_k_quant_mixed"
    assert recipes.choose(records, "fastest")["recipe"] == "int8"
    # fp16 is bigger and no more accurate than int8: not on the front
    assert recipes.pareto_front(records) == ["int4_rtn_b32", "int4_k_quant_mixed", "int8"]


def test_size_against_label_kl_front_and_picture():
    fid = {"int4_rtn_b32": 0.30, "int4_k_quant_mixed": 0.19, "int4_sensitive": 0.14, "int8": 0.001,
           "fp16": 0.002}
    sizes = {"int4_rtn_b32": 80, "int4_k_quant_mixed": 110, "int4_sensitive": 100, "int8": 180,
             "fp16": 270}
    records = []
    for name, kl in fid.items():
        r = _record(name, sizes[name], 0.9)
        r["label_kl"] = kl
        records.append(r)
    # k_quant_mixed is bigger than sensitive and further from merged; fp16 bigger than int8 and further
    assert recipes.pareto_front(records, "label_kl") == ["int4_rtn_b32", "int4_sensitive", "int8"]
    summary = recipes.search_summary(records, "smallest", 0.9, 0.02, RecipeSearchConfig(max_label_kl=0.2),
                                     chosen_on="validation")
    assert summary["chosen_on"] == "validation" and summary["pareto_front_kl"][0] == "int4_rtn_b32"
    svg = recipes.search_svg(summary, "label_kl")
    assert "label KL(merged ‖ candidate) on validation" in svg and "floor 0.2" in svg
    assert "gate" not in svg and svg.count("<circle") == len(records) + 1  # + the chosen ring


def test_failed_candidates_are_recorded_and_the_search_goes_on():
    calls = []

    def run(name):
        calls.append(name)
        if name == "int4_rtn_b128":
            return recipes.candidate_record(name, None, None, 0.9, 0.02,
                                            error="StageCheckError: builder failed: 576 % 128")
        return _record(name, {"int4_k_quant": 90, "int8": 180}[name], 0.9)

    cfg = RecipeSearchConfig(candidates=["int4_rtn_b128", "int4_k_quant", "int8"])
    records = recipes.run_search(cfg, run, parallel=1)
    assert calls == ["int4_rtn_b128", "int4_k_quant", "int8"]
    summary = recipes.search_summary(records, "smallest", 0.9, 0.02)
    assert summary["chosen"] == "int4_k_quant"
    rows = {r["recipe"]: r for r in recipes.recipe_table(summary)}
    assert rows["int4_rtn_b128"]["verdict"].startswith("failed: StageCheckError: builder failed")
    assert rows["int4_k_quant"]["verdict"] == "chosen (smallest within the gate)"
    svg = recipes.search_svg(summary)
    assert svg.startswith("<svg") and "int4_rtn_b128" in svg and "chosen" in svg


def test_the_separate_forms_refusals_are_the_recipes_it_cannot_build():
    """SEPARATE_REFUSALS (the config's, below slmflow.recipes) names exactly the recipes not
    quantized by the builder or with a sensitivity budget."""
    cannot = {name for name, r in recipes.RECIPES.items()
              if r.get("quantizer", "builder") != "builder" or r.get("sensitivity", {}).get("int8_budget")}
    assert set(SEPARATE_REFUSALS) == cannot == {"int4_hqq", "int4_gptq", "int4_sensitive"}
    assert recipes.separate_refusal("int4_k_quant") is None


def test_a_separate_search_weighs_base_plus_adapter_and_says_so():
    """export.adapters=separate: each candidate is a base build + this fine-tune's adapter file;
    its size is both, the rule is the merged search's, the report says which form it was."""
    from slmflow.report import _search_section

    def separate(name, base_mb, acc):
        base = _ref("onnx_base", name, size_bytes=int(base_mb * 2**20))
        adapter = _ref("onnx_adapter", name + "a", size_bytes=2**20)
        ev = _ref("evaluation", name + "e", accuracy=acc, macro_f1=acc, latency_ms_p50=1.0,
                  latency_ms_p95=2.0)
        return recipes.candidate_record(name, base, ev, 0.9, 0.02, adapter=adapter)

    records = [separate("int4_rtn_b32", 80, 0.85), separate("int4_k_quant", 88, 0.9),
               separate("int8", 180, 0.9)]
    assert records[1]["size_bytes"] == 89 * 2**20
    assert (records[1]["base_bytes"], records[1]["adapter_bytes"]) == (88 * 2**20, 2**20)
    assert records[1]["adapter_key"] == "int4_k_quanta" and records[1]["onnx_key"] == "int4_k_quant"
    summary = recipes.search_summary(records, "smallest", 0.9, 0.02, form="separate",
                                     left_out={"int4_sensitive": "not shared"})
    assert summary["chosen"] == "int4_k_quant"  # rtn_b32 is smaller, but below the gate
    row = next(r for r in recipes.recipe_table(summary) if r["recipe"] == "int4_k_quant")
    assert (row["size_mb"], row["base_mb"], row["adapter_mb"]) == (89.0, 88.0, 1.0)
    assert "base + adapter size (MB)" in recipes.search_svg(summary)
    text = _search_section(summary, inline=False)[0]
    assert "Candidates in the separate form" in text and "size = base + adapter" in text
    assert "Left out (the separate form cannot build them): int4_sensitive: not shared." in text
    assert "| recipe | size_mb | base_mb | adapter_mb |" in text
    merged = recipes.search_summary([_record("int8", 180, 0.9)], "smallest", 0.9, 0.02)
    assert merged["form"] == "merged" and "base_mb" not in recipes.recipe_table(merged)[0]
    assert "separate form" not in _search_section(merged, inline=False)[0]
    none = recipes.search_summary(records[:1], "smallest", 0.9, 0.02, form="separate")
    assert "no candidate (each a base build + this fine-tune's adapter file) holds the quality " \
           "gate" in recipes.failure_message(none)


def test_parallel_search_keeps_the_config_order():
    seen = set()

    def run(name):
        seen.add(threading.current_thread().name)
        return _record(name, 100, 0.9)

    cfg = RecipeSearchConfig(candidates=["int8", "fp16", "int4_k_quant", "int4_default"])
    records = recipes.run_search(cfg, run, parallel=2)
    assert [r["recipe"] for r in records] == cfg.candidates
    assert all(name.startswith("recipe") for name in seen)


def test_parallel_limit_follows_memory(monkeypatch):
    from slmflow import resources

    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 5 * 2**30)
    cfg = RecipeSearchConfig(max_parallel=4)
    logged = []
    # 135M parameters: an export needs ~1.5 GiB -> 3 fit in 5 GiB
    assert recipes.parallel_limit(cfg, 135_000_000, log=logged.append) == 3
    assert "3 candidate(s) at a time, not 4" in logged[0]
    assert recipes.parallel_limit(RecipeSearchConfig(max_parallel=1), 10**12) == 1


def test_no_candidate_within_the_gate_lists_them_all():
    records = [_record("int4_rtn_b32", 80, 0.80), _record("int4_k_quant", 85, 0.84),
               recipes.candidate_record("fp16", None, None, 0.9, 0.02, error="RuntimeError: boom")]
    summary = recipes.search_summary(records, "smallest", 0.9, 0.02)
    assert summary["chosen"] is None
    message = recipes.failure_message(summary)
    assert "no candidate holds the quality gate (accuracy >= 0.8800" in message
    assert "int4_rtn_b32 0.8000; int4_k_quant 0.8400; fp16 failed (RuntimeError: boom)" in message


def test_search_config_is_validated_naming_the_field():
    with pytest.raises(ConfigError, match=r"export.search.candidates.0: Input should be 'int4_rtn_b128'"):
        build_config({"export": {"recipe": "auto", "search": {"candidates": ["int3"]}}})
    with pytest.raises(ConfigError, match=r"export.search.candidates: int8 listed twice"):
        build_config({"export": {"search": {"candidates": ["int8", "int8"]}}})
    with pytest.raises(ConfigError, match=r"export.search.candidates: List should have at least 1 item"):
        build_config({"export": {"search": {"candidates": []}}})
    with pytest.raises(ConfigError, match=r"export.recipe: Input should be 'manual' or 'auto'"):
        build_config({"export": {"recipe": "search"}})
    assert PipelineConfig().export.recipe == "manual"


def _faithful(name, size_mb, acc, agreement, kl):
    onnx = _ref("onnx_model", name, size_bytes=int(size_mb * 2**20))
    ev = _ref("evaluation", name + "e", accuracy=acc, macro_f1=acc, latency_ms_p50=1.0,
              latency_ms_p95=2.0)
    floors = RecipeSearchConfig(min_agreement=0.99, max_label_kl=0.05)
    return recipes.candidate_record(name, onnx, ev, 0.9, 0.02, None,
                                    {"agreement": agreement, "label_kl_mean": kl}, floors)


def test_fidelity_floors_rule_out_a_candidate_the_accuracy_gate_lets_through():
    records = [_faithful("int4_rtn_b128", 80, 0.9, 0.95, 0.01),   # same accuracy, other answers
               _faithful("int4_rtn_b32", 90, 0.9, 0.995, 0.2),    # agrees, distributions moved
               _faithful("int4_hqq", 95, 0.89, 1.0, 0.01),        # within everything
               _faithful("int4_k_quant_mixed", 110, 0.5, 1.0, 0.0)]  # below the accuracy gate
    assert [r["verdict"] for r in records] == [
        "below fidelity floor", "below fidelity floor", "passed", "below gate"]
    floors = RecipeSearchConfig(min_agreement=0.99, max_label_kl=0.05)
    summary = recipes.search_summary(records, "smallest", 0.9, 0.02, floors)
    assert summary["chosen"] == "int4_hqq"
    assert (summary["min_agreement"], summary["max_label_kl"]) == (0.99, 0.05)
    row = next(r for r in recipes.recipe_table(summary) if r["recipe"] == "int4_rtn_b128")
    assert (row["agreement"], row["label_kl"]) == (0.95, 0.01)

    records[2] = _faithful("int4_hqq", 95, 0.89, 0.98, 0.01)
    summary = recipes.search_summary(records, "smallest", 0.9, 0.02, floors)
    assert summary["chosen"] is None
    message = recipes.failure_message(summary)
    assert "agreement >= 0.99 and label KL <= 0.05 (export.search)" in message
    assert "int4_hqq 0.8900 (agreement 0.980, KL 0.0100)" in message
    assert "looser export.search floors" in message


def test_without_floors_fidelity_is_reported_but_does_not_decide():
    onnx = _ref("onnx_model", "x", size_bytes=1)
    ev = _ref("evaluation", "xe", accuracy=0.9, macro_f1=0.9, latency_ms_p50=1.0, latency_ms_p95=1.0)
    record = recipes.candidate_record("int4_hqq", onnx, ev, 0.9, 0.02, None,
                                      {"agreement": 0.5, "label_kl_mean": 3.0}, RecipeSearchConfig())
    assert record["verdict"] == "passed" and record["agreement"] == 0.5


def test_new_export_fields_leave_the_keys_of_earlier_exports_alone(tmp_path):
    """The quantizer and sensitivity fields enter an export's key only when used."""
    from slmflow.stages.export import key_config

    before = {"precision", "execution_provider", "algo_config", "block_size", "accuracy_level",
              "matmul_mixed_precision", "extra_options"}
    assert set(key_config(ExportConfig())) == before
    hqq = recipes.candidate_config(ExportConfig(), "int4_hqq")
    assert set(key_config(hqq)) == before | {"quantizer"}
    gptq = recipes.candidate_config(ExportConfig(), "int4_gptq")
    assert set(key_config(gptq)) == before | {"quantizer", "calibration_rows"}
    sensitive = recipes.candidate_config(ExportConfig(), "int4_sensitive")
    assert key_config(sensitive)["sensitivity"] == {"int8_budget": 0.25, "rows": 16}
    merged, data = _ref("merged_model", "m"), _ref("dataset", "d")
    store = Store.at(tmp_path)
    keys = {STAGE.key(recipes.candidate_config(ExportConfig(), n), store, merged=merged, data=data)
            for n in ("int4_default", "int4_hqq", "int4_gptq", "int4_sensitive")}
    assert len(keys) == 4


@pytest.mark.parametrize(("sets", "match"), [
    (["export.quantizer=hqq", "export.precision=int8"], r"export.quantizer=hqq makes int4 models"),
    (["export.quantizer=gptq", "export.execution_provider=cuda"], r"execution_provider=cpu"),
    (["export.quantizer=hqq", "export.sensitivity.int8_budget=0.2"],
     r"quantizes every MatMul alike; drop export.matmul_mixed_precision"),
    (["export.precision=fp16", "export.sensitivity.int8_budget=0.2"],
     r"int8_budget keeps int4 MatMuls at int8: set export.precision=int4"),
    (["export.search.min_agreement=1.5"], r"min_agreement"),
])
def test_export_quantizer_settings_that_cannot_work_are_refused(sets, match):
    from slmflow.configio import apply_overrides

    with pytest.raises(ConfigError, match=match):
        build_config(apply_overrides({}, sets), source="test")


def test_builder_gets_the_int8_nodes_as_exact_overrides(tmp_path):
    import json as _json

    from slmflow.stages.export import builder_command

    cfg = recipes.candidate_config(ExportConfig(), "int4_sensitive")
    nodes = ["/model/layers.3/mlp/down_proj/MatMul"]
    cmd = builder_command(cfg, tmp_path / "m", tmp_path / "o", tmp_path / "c", nodes, tied=True)
    weights = _json.loads(cmd[cmd.index("--target_options") + 1])["quant_config"]["weights"]
    assert weights["overrides"] == [{"match": {"name": nodes[0]}, "type": "int8"}]
    assert weights["op_types"] == ["MatMul", "Gather"]  # a tied embedding stays int4
    untied = builder_command(cfg, tmp_path / "m", tmp_path / "o", tmp_path / "c", nodes)
    assert "op_types" not in _json.loads(untied[untied.index("--target_options") + 1])[
        "quant_config"]["weights"]
    hqq = builder_command(recipes.candidate_config(ExportConfig(), "int4_hqq"), tmp_path / "m",
                          tmp_path / "o", tmp_path / "c")
    assert hqq[hqq.index("-p") + 1] == "fp32" and "--target_options" not in hqq
