"""Answer parsing, metrics, the quality gate and the report's pictures."""

from __future__ import annotations

import json

from slmflow.artifacts import ArtifactRef
from slmflow.config import PipelineConfig
from slmflow.report import build_report, confusion_svg, loss_curve_svg, model_table, write_report
from slmflow.stages.evaluate import OTHER, parse_answer, score

LABELS = ["Sad", "Joy", "Fear", "Surprise"]


def test_parse_answer():
    assert parse_answer(" Joy\n### Text", LABELS) == "Joy"
    assert parse_answer("surprise!", LABELS) == "Surprise"
    assert parse_answer("I think it is sad", LABELS) == OTHER


def test_score_accuracy_f1_confusion():
    m = score(["Sad", "Sad", "Joy", "Fear"], ["Sad", "Joy", "Joy", OTHER], LABELS)
    assert m["accuracy"] == 0.5 and m["n"] == 4
    assert m["confusion"]["Sad"]["Joy"] == 1 and m["confusion"]["Fear"][OTHER] == 1
    # F1: Sad 2/3, Joy 2/3, Fear 0, Surprise 0
    assert abs(m["macro_f1"] - (2 / 3 + 2 / 3) / 4) < 1e-9


def _ref(kind, uri, meta):
    return ArtifactRef(kind=kind, uri=str(uri), sha256="0" * 64, key="k", meta=meta)


def _evaluation(folder, acc):
    """An evaluation folder of two rows, right on both (acc 1) or on the first only (acc 0)."""
    pred = ["Sad", "Joy"] if acc == 1 else ["Sad", "Sad"]
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"line": i, "gold": g, "pred": p, "answer": p, "label_probs": {g: 0.9, "Fear": 0.1}}
            for i, (g, p) in enumerate(zip(["Sad", "Joy"], pred))]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = score(["Sad", "Joy"], pred, LABELS)
    meta = m | {"latency_ms_p50": 1.0, "latency_ms_p95": 2.0, "tokens_per_second": 9.0,
                "size_bytes": 10, "accuracy_ci95": [0.2, 1.0]}
    return _ref("evaluation", folder, meta)


def _report(tmp_path, merged_acc, exported_acc, drop=0.02):
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "train_log.json").write_text(json.dumps([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]))
    config = PipelineConfig(evaluate={"max_accuracy_drop": drop, "extra_files": []},
                            output_dir=str(tmp_path / "out"))
    evals = {"base": _evaluation(tmp_path / "b", 0), "merged": _evaluation(tmp_path / "m", merged_acc),
             "exported": _evaluation(tmp_path / "e", exported_acc)}
    return build_report(config, _ref("dataset", "d", {}), _ref("adapter", adapter, {"steps": 2}),
                        _ref("merged_model", "m", {}), _ref("onnx_model", "o", {}), {"eval": evals},
                        {"finetune": {"seconds": 1.0, "cached": False}}, 3.0)


def test_gate_passes_and_fails(tmp_path):
    assert _report(tmp_path, 1, 1)["quality_gate"]["passed"]
    failed = _report(tmp_path, 1, 0)["quality_gate"]
    assert not failed["passed"] and failed["drop"] == 0.5
    # one row of two: the drop is real here, yet within noise on so few rows
    assert failed["agreement"] == 0.5 and failed["mcnemar_p"] == 1.0 and failed["within_noise"]
    assert _report(tmp_path, 1, 0, drop=0.5)["quality_gate"]["passed"]


def test_report_files(tmp_path):
    report = _report(tmp_path, 1, 1)
    path = write_report(report, tmp_path / "out")
    loaded = json.loads(path.read_text())
    assert loaded["models"]["exported"]["accuracy"] == 1.0 and loaded["exported_model_dir"] == "o"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "confusion_exported.svg" in md and "loss_curve.svg" in md and "| Exported (ONNX) |" in md
    assert "## Fidelity of the exported model to the merged one" in md
    assert "| eval | 2 | 1.0000 [0.200, 1.000] | 1.0000 [0.200, 1.000] | 1.0 |" in md
    assert "McNemar p = 1.000: the difference is within noise" in md
    assert (tmp_path / "out" / "confusion_exported.svg").read_text().startswith("<svg")
    assert loaded["selection"] == {"trained_on": "the train split", "gate_judged_on": "eval",
                                   "recipe_chosen_on": None, "untouched_sets": []}
    assert "the gate judged on eval. Figures on none were used for no choice" in md


def test_selection_names_the_sets_no_choice_has_seen():
    from slmflow.report import _selection_line, selection

    sel = selection("tones_shifted", ["eval", "tones_shifted", "other"], {"chosen_on": "tones_shifted"})
    assert sel["recipe_chosen_on"] == "tones_shifted" and sel["untouched_sets"] == ["eval", "other"]
    line = _selection_line(sel)
    assert "the export recipe was chosen on tones_shifted" in line
    assert "Figures on eval, other were used for no choice" in line
    # with a validation split the search chooses there: the gate's set is the only other one used
    sel = selection("eval", ["eval", "tones_shifted", "validation"], {"chosen_on": "validation"})
    assert sel["recipe_chosen_on"] == "validation" and sel["untouched_sets"] == ["tones_shifted"]
    assert selection("eval", ["eval", "x"], None)["recipe_chosen_on"] is None


def test_svgs_render_values():
    svg = loss_curve_svg([{"step": 1, "loss": 2.0}, {"step": 5, "loss": 0.5}])
    assert "<polyline" in svg
    cm = score(["Sad"], ["Sad"], LABELS)["confusion"]
    assert ">1</text>" in confusion_svg(cm, "t")


def test_a_failed_gate_says_where_by_how_much_and_whether_it_is_within_noise(tmp_path):
    import pytest

    from flows.pipeline import check_quality_gate
    from slmflow.errors import QualityGateError

    report = _report(tmp_path, 1, 0)
    with pytest.raises(QualityGateError, match=r"quality gate failed on eval: exported accuracy "
                       r"0\.5000 is 0\.5000 below merged 1\.0000 \(allowed 0\.02\); McNemar p = "
                       r"1\.000, within noise on this many rows; outputs kept"):
        check_quality_gate(report, tmp_path / "report.json")
    check_quality_gate(_report(tmp_path, 1, 1), tmp_path / "report.json")  # passes: no error


def test_the_gate_judges_constrained_answers_only_when_told(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "train_log.json").write_text("[]")

    def report(constrained: bool):
        config = PipelineConfig(evaluate={"max_accuracy_drop": 0.02, "extra_files": [],
                                          "constrained": constrained}, output_dir=str(tmp_path / "o"))
        # free: exported right on one row of two; constrained: both models right on both
        evals = {"merged": _evaluation(tmp_path / "m", 1), "exported": _evaluation(tmp_path / "e", 0)}
        for ref, acc in ((evals["merged"], 1.0), (evals["exported"], 1.0)):
            ref.meta["accuracy_constrained"] = acc
        return build_report(config, _ref("dataset", "d", {}), _ref("adapter", tmp_path / "adapter", {"steps": 2}),
                            _ref("merged_model", "m", {}), _ref("onnx_model", "o", {}),
                            {"eval": evals}, {}, 1.0)

    free, constrained = report(False)["quality_gate"], report(True)["quality_gate"]
    assert (free["answers"], free["passed"], free["exported_accuracy"]) == ("free", False, 0.5)
    assert (constrained["answers"], constrained["passed"]) == ("constrained", True)
    rows = {r["model"]: r for r in model_table(report(True)["models"])}
    assert rows["Exported (ONNX)"]["accuracy_constrained"] == 1.0


def test_a_failed_gate_on_k_quant_mixed_suggests_something_else(tmp_path):
    """The issue's case: a run already on k_quant_mixed was told to try k_quant_mixed."""
    import pytest

    from flows.pipeline import check_quality_gate
    from slmflow.errors import QualityGateError

    report = _report(tmp_path, 1, 0)
    report["config"]["export"]["algo_config"] = "k_quant_mixed"
    with pytest.raises(QualityGateError) as failed:
        check_quality_gate(report, tmp_path / "report.json")
    hint = str(failed.value).split("; try ", 1)[1]
    assert "k_quant_mixed" not in hint
    assert hint == ("export.recipe=auto (exports every candidate recipe, keeps the smallest within "
                    "the gate) or export.precision=int8 or a larger evaluate.max_accuracy_drop "
                    "(now 0.02)")


def test_gate_hints_never_name_what_is_in_use():
    from slmflow.suggest import gate_hints

    auto = PipelineConfig(export={"recipe": "auto"}).model_dump(mode="json")
    assert [h.split(" ")[0] for h in gate_hints(auto)] == ["a"]  # only a larger drop is left
    auto["export"]["search"]["candidates"] = ["int4_k_quant"]
    assert gate_hints(auto)[0] == "int8 in export.search.candidates"
    int8 = PipelineConfig(export={"precision": "int8"}).model_dump(mode="json")
    assert "export.precision=fp16" in gate_hints(int8) and "export.precision=int8" not in gate_hints(int8)
    qlora = PipelineConfig(finetune={"method": "qlora"}).model_dump(mode="json")
    # for QLoRA, the other merge base than the one the merge used (auto resolved by the merge)
    assert any(h.startswith("merge.base_weights=original") for h in gate_hints(qlora, "dequantized"))
    assert any(h.startswith("merge.base_weights=dequantized") for h in gate_hints(qlora, "original"))
    lora = PipelineConfig().model_dump(mode="json")
    assert not any(h.startswith("merge.") for h in gate_hints(lora, "original"))


def test_a_qlora_report_judges_merged_and_exported_against_the_trained_model(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "train_log.json").write_text(json.dumps([{"step": 1, "loss": 1.0}]))
    config = PipelineConfig(finetune={"method": "qlora"}, evaluate={"extra_files": []},
                            output_dir=str(tmp_path / "out"))
    trained = _evaluation(tmp_path / "t", 1)
    trained.meta["size_bytes"] = None  # not a shipped model
    evals = {"base": _evaluation(tmp_path / "b", 0), "trained": trained,
             "merged": _evaluation(tmp_path / "m", 1), "exported": _evaluation(tmp_path / "e", 0)}
    forms = {f: {"merge_exactness": 1e-6, "vs_trained": {"max_logit_diff": d, "mean_logit_diff": d / 10,
                                                          "top1_agreement": a}}
             for f, d, a in (("original", 2.5, 0.9), ("dequantized", 1e-5, 1.0))}
    merge = {"max_logit_diff": 1e-6, "base_weights": "dequantized", "forms": forms}
    report = build_report(config, _ref("dataset", "d", {}), _ref("adapter", tmp_path / "adapter", {}),
                          _ref("merged_model", "m", merge), _ref("onnx_model", "o", {}), {"eval": evals},
                          {}, 1.0)
    fid = report["sets"]["eval"]["fidelity"]
    assert fid["merged_vs_trained"]["agreement"] == 1.0 and fid["exported_vs_trained"]["agreement"] == 0.5
    write_report(report, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| Trained (4-bit base + adapter) | 1.0 |" in md and "| 2 |" in md
    assert "## Fidelity to the trained model (QLoRA)" in md
    assert "| eval | exported | 2 | 0.5 |" in md
    assert "| dequantized (written) | 1e-05 |" in md and "| original | 2.5 |" in md
