"""The embedded default on the real SmolLM2-135M-Instruct: accuracy that means something.

This is the README's run command (`slmflow run`), through Prefect's ephemeral API, into a temp
folder (the session's shared `smollm2_run`). Minutes on 2 CPU cores.

The thresholds leave a margin no change of CPU crosses: measured here, base 0.00, merged and
int4 0.903 (130 of 144 eval rows); a CPU with other float rounding trains a slightly different
adapter and moves these by a row or two, not by the 22 rows between 0.903 and 0.75. On the
shifted set (240 rows in other sentence frames) merged 0.838 and int4 0.763 here: the checks
there are that it is evaluated and reported, with margins of 40+ rows.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow
LEARNED = 0.75  # fine-tuned accuracy at least this (measured 0.903); the base model answers prose
MAX_INT4_DROP = 0.10  # int4 vs merged, 14 rows (measured 0.0)


def test_default_run_reaches_accuracy_and_reruns_cached(smollm2_run):
    report = smollm2_run.report
    models = report["models"]
    assert models["merged"]["accuracy"] >= LEARNED, models["merged"]
    assert models["exported"]["accuracy"] >= LEARNED, models["exported"]
    assert models["merged"]["accuracy"] - models["exported"]["accuracy"] <= MAX_INT4_DROP, models
    assert models["merged"]["accuracy"] - models["base"]["accuracy"] >= 0.3, models
    assert models["exported"]["n"] == report["data"]["eval"]["rows"] >= 120
    assert report["config"]["finetune"]["max_steps"] == 100  # the default, not a shortened run
    shifted = report["sets"]["tones_shifted"]  # the bundled shifted set, evaluated by default
    assert shifted["models"]["merged"]["n"] == 240
    assert shifted["models"]["merged"]["accuracy"] >= 0.6 and shifted["models"]["exported"]["accuracy"] >= 0.5
    for name in ("eval", "tones_shifted"):
        fid = report["sets"][name]["fidelity"]["exported_vs_merged"]
        assert 0.5 <= fid["agreement"] <= 1 and fid["label_kl_mean"] >= 0 and "disagreements" in fid

    import onnxruntime_genai as og

    og.Model(report["exported_model_dir"])  # the int4 folder loads in onnxruntime-genai

    _, again = smollm2_run.run()
    assert all(s["cached"] for s in again["stages"].values()), again["stages"]
    assert again["models"] == models


def test_default_model_answers_free_and_constrained_through_its_folder(smollm2_run):
    """The published folder is used on its own: constrained accuracy beside the free one in the
    report, and the Classifier's constrained answers are labels, equal to the evaluation's."""
    import json
    from pathlib import Path

    from slmflow import Classifier
    from slmflow.artifacts import read_verified
    from slmflow.folders import read_split

    report = smollm2_run.report
    exported = report["models"]["exported"]
    assert exported["constrained_by"] == "guidance"
    assert exported["accuracy_constrained"] >= exported["accuracy"] - MAX_INT4_DROP, exported
    assert "accuracy_constrained" in (smollm2_run.out / "report.md").read_text()
    evaluated = [json.loads(line) for line in
                 (Path(report["stages"]["evaluate_exported"]["uri"]) / "predictions.jsonl").open()]
    split = read_split(read_verified(Path(report["stages"]["prepare_data"]["uri"])), "eval")[:32]
    clf = Classifier(report["exported_model_dir"])
    preds = clf.predict(split)
    assert [p.label for p in preds] == [r["pred_constrained"] for r in evaluated[:32]]
    assert all(p.label in clf.labels for p in preds)
