"""How closely a model answers like a reference model on the same rows, and how sure a
difference in accuracy is.

- Top-1 agreement: the share of rows where both give the same answer (the label their greedy
  answer starts with, or "(other)").
- Label KL: the mean over rows of KL(reference ‖ model) between the two models' distributions
  over the label set at the answer position (each label scored as the sum of its tokens'
  log-probabilities after the prompt, teacher-forced, then normalized over the labels), as
  llama.cpp judges its quantizations against the full-precision model.
- Accuracy with a 95% Wilson interval, and an exact McNemar test on the rows where exactly one of
  the two is right: a p-value of 0.05 or more means the accuracy difference is within what chance
  alone gives on this many rows.
"""

from __future__ import annotations

import math
from typing import Any

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct/n (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(only_reference: int, only_model: int) -> float:
    """Two-sided exact McNemar p-value: under "the two are equally accurate", each row right for
    exactly one of them is that one with probability 1/2."""
    n = only_reference + only_model
    if n == 0:
        return 1.0
    k = min(only_reference, only_model)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def kl_divergence(p: dict[str, float], q: dict[str, float], eps: float = 1e-12) -> float:
    """KL(p ‖ q) over the labels of p, in nats (q's zeros clamped to eps)."""
    return sum(pv * (math.log(max(pv, eps)) - math.log(max(q.get(label, 0.0), eps)))
               for label, pv in p.items() if pv > 0)


def normalized(log_scores: dict[str, float]) -> dict[str, float]:
    """Label log-scores → probabilities over the label set (a softmax)."""
    top = max(log_scores.values())
    weights = {label: math.exp(s - top) for label, s in log_scores.items()}
    total = sum(weights.values())
    return {label: w / total for label, w in weights.items()}


def compare(reference: list[dict[str, Any]], model: list[dict[str, Any]]) -> dict[str, Any]:
    """Fidelity of `model` to `reference` on the same rows (predictions.jsonl records: line,
    gold, pred, answer, label_probs)."""
    if [r["line"] for r in reference] != [m["line"] for m in model]:
        raise ValueError("the two evaluations are not of the same rows")
    n = len(reference)
    agree = [r["pred"] == m["pred"] for r, m in zip(reference, model)]
    kls = [kl_divergence(r["label_probs"], m["label_probs"]) for r, m in zip(reference, model)
           if r.get("label_probs") and m.get("label_probs")]
    only_ref = sum(r["pred"] == r["gold"] and m["pred"] != m["gold"] for r, m in zip(reference, model))
    only_model = sum(r["pred"] != r["gold"] and m["pred"] == m["gold"] for r, m in zip(reference, model))
    p_value = mcnemar_exact(only_ref, only_model)
    ordered = sorted(kls)
    return {
        "rows": n,
        "agreement": sum(agree) / n if n else 0.0,
        "label_kl_mean": sum(kls) / len(kls) if kls else None,
        "label_kl_p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if kls else None,
        "label_kl_max": ordered[-1] if kls else None,
        "right_only_reference": only_ref,
        "right_only_model": only_model,
        "mcnemar_p": p_value,
        "difference_within_noise": p_value >= 0.05,
        "disagreements": [
            {"line": r["line"], "gold": r["gold"], "reference": r["pred"], "model": m["pred"],
             "reference_answer": r.get("answer"), "model_answer": m.get("answer")}
            for r, m, same in zip(reference, model, agree) if not same],
    }


def read_predictions(evaluation: Any) -> list[dict[str, Any]]:
    """The rows of an evaluation stage folder (`predictions.jsonl`)."""
    import json
    from pathlib import Path

    with open(Path(evaluation.uri) / "predictions.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def summarize_set(evaluations: dict[str, Any]) -> dict[str, Any]:
    """One eval set of a run: each model's metrics, and the exported and base models' fidelity
    to the merged one; after QLoRA also the merged and exported models' fidelity to the trained
    one (the 4-bit base with the adapter: the model the fine-tune made)."""
    rows = {name: read_predictions(ref) for name, ref in evaluations.items()}
    pairs = [(who, "merged") for who in ("exported", "exported_merged", "base")]
    pairs += [(who, "trained") for who in ("merged", "exported")]
    fidelity = {f"{who}_vs_{ref}": compare(rows[ref], rows[who])
                for who, ref in pairs if who in rows and ref in rows}
    return {"models": {name: ref.meta for name, ref in evaluations.items()}, "fidelity": fidelity}
