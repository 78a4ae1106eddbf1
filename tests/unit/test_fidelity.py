"""Fidelity of one model to another on the same rows: agreement, label KL, Wilson intervals and the
exact McNemar test, on constructed distributions and known tables."""

from __future__ import annotations

import math

import pytest

from slmflow.fidelity import compare, kl_divergence, mcnemar_exact, normalized, wilson_interval


def test_kl_is_zero_for_the_same_distribution_and_known_otherwise():
    p = {"Sad": 0.5, "Joy": 0.5}
    assert kl_divergence(p, p) == 0.0
    q = {"Sad": 0.25, "Joy": 0.75}
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.1438 nats
    assert kl_divergence(p, q) == pytest.approx(expected)
    assert kl_divergence(p, {"Sad": 1.0, "Joy": 0.0}) > 10  # a label it rules out: a large KL


def test_label_scores_normalize_over_the_label_set():
    probs = normalized({"Sad": math.log(2.0), "Joy": math.log(6.0), "Fear": -1000.0})
    assert probs["Joy"] == pytest.approx(0.75) and probs["Sad"] == pytest.approx(0.25)
    assert sum(probs.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(("b", "c", "p"), [
    (0, 0, 1.0),
    (4, 0, 0.125),  # 2 × 0.5**4
    (3, 1, 0.625),  # 2 × (1 + 4) / 16
    (10, 2, 0.03857421875),  # 2 × (1 + 12 + 66) / 4096
])
def test_mcnemar_exact_on_known_tables(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p)
    assert mcnemar_exact(c, b) == pytest.approx(p)  # two-sided


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = wilson_interval(130, 144)  # the default run's 0.903 on 144 rows
    assert (round(lo, 3), round(hi, 3)) == (0.843, 0.941)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _row(line, gold, pred, probs):
    return {"line": line, "gold": gold, "pred": pred, "answer": pred, "label_probs": probs}


def test_compare_counts_agreement_disagreements_and_the_rows_only_one_gets_right():
    sure = {"Sad": 0.9, "Joy": 0.1}
    unsure = {"Sad": 0.5, "Joy": 0.5}
    reference = [_row(1, "Sad", "Sad", sure), _row(2, "Joy", "Joy", sure), _row(3, "Sad", "Sad", sure),
                 _row(4, "Joy", "Sad", sure)]
    model = [_row(1, "Sad", "Sad", sure), _row(2, "Joy", "Sad", unsure), _row(3, "Sad", "Sad", sure),
             _row(4, "Joy", "Joy", unsure)]
    out = compare(reference, model)
    assert out["agreement"] == 0.5
    assert [d["line"] for d in out["disagreements"]] == [2, 4]
    assert (out["right_only_reference"], out["right_only_model"]) == (1, 1)
    assert out["mcnemar_p"] == 1.0 and out["difference_within_noise"]
    kl = kl_divergence(sure, unsure)
    assert out["label_kl_mean"] == pytest.approx(kl / 2) and out["label_kl_max"] == pytest.approx(kl)


def test_compare_refuses_evaluations_of_other_rows():
    with pytest.raises(ValueError, match="not of the same rows"):
        compare([_row(1, "Sad", "Sad", {})], [_row(2, "Sad", "Sad", {})])
