"""Stage 6: evaluate a model on the held-out split by what it answers.

Each prompt is continued greedily (PyTorch for the base and merged models, onnxruntime-genai for
the exported one; the same prompt token ids for both; `slmflow.generate`) and the answer is read
as the label it starts with. Records accuracy, macro-F1, the confusion matrix, latency per
example (p50/p95: the time it waited for its batch), examples and generated tokens per second,
and the model's size on disk; `predictions.jsonl` keeps every answer.

Constrained accuracy beside it (`accuracy_constrained`, `constrained_by`): the exported model
generates inside a regular expression of the labels (onnxruntime-genai's guidance); the base and
merged models answer the label their own scores rank first (`label_probabilities`, the scoring
the fidelity metrics use: one implementation, no second generation loop to keep equal to
onnxruntime-genai's). The quality gate judges the free answer unless `evaluate.constrained`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from slmflow.artifacts import ArtifactRef, dir_size
from slmflow.config import EvaluateConfig
from slmflow.errors import StageCheckError
from slmflow.stage import REQUIRED, Stage, Workspace

OTHER = "(other)"


def parse_answer(text: str, labels: list[str]) -> str:
    """The label an answer starts with (exact case first, then any case), else OTHER."""
    text = text.strip()
    by_length = sorted(labels, key=len, reverse=True)
    for label in by_length:
        if text.startswith(label):
            return label
    for label in by_length:
        if text.lower().startswith(label.lower()):
            return label
    return OTHER


def score(gold: list[str], pred: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the label set, and the confusion matrix (rows gold, cols pred)."""
    cols = labels + [OTHER]
    matrix = {g: {p: 0 for p in cols} for g in labels}
    for g, p in zip(gold, pred):
        matrix[g][p] += 1
    f1s = []
    for label in labels:
        tp = matrix[label][label]
        fp = sum(matrix[g][label] for g in labels if g != label)
        fn = sum(matrix[label][p] for p in cols if p != label)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    correct = sum(g == p for g, p in zip(gold, pred))
    return {
        "accuracy": correct / len(gold),
        "macro_f1": sum(f1s) / len(f1s),
        "confusion": matrix,
        "n": len(gold),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def key_config(cfg: EvaluateConfig, labels: list[str], split: str,
               quantization: dict[str, Any] | None = None, **_: Any) -> dict[str, Any]:
    """What an evaluation depends on: not the quality gate, which judges it afterwards. The
    trained QLoRA model is also keyed by the 4-bit settings it is loaded with (other models'
    keys stay as they were)."""
    judged_after = {"max_accuracy_drop", "extra_files", "gate_set", "constrained",
                    "compare_merged_export"}
    dumped = cfg.model_dump(mode="json", exclude=judged_after)
    if cfg.max_examples is None:  # the evaluations made before the sample existed keep their keys
        dumped.pop("max_examples")
        dumped.pop("sample_seed")
    keyed = {"evaluate": dumped, "labels": labels, "split": split}
    return keyed | ({"quantization": quantization} if quantization else {})


# Rows evaluated at a time: a large set is read and answered in chunks, never held whole (the
# default run's sets, 144 and 240 rows, are one chunk: batches as before chunks existed).
CHUNK_ROWS = 1024


def eval_rows(cfg: EvaluateConfig, data: ArtifactRef, split: str
              ) -> tuple[Iterable[dict[str, Any]], dict[str, Any] | None]:
    """The rows to evaluate, as a stream (evaluate.limit, then the max_examples sample), and
    what was sampled (None: every row)."""
    from slmflow.folders import iter_split
    from slmflow.sampling import stratified_sample

    def rows() -> Iterable[dict[str, Any]]:
        return islice(iter_split(data, split), cfg.limit)

    if cfg.max_examples is None:
        return rows(), None
    sample, record = stratified_sample(rows, cfg.max_examples, cfg.sample_seed)
    return sample, record


def build(cfg: EvaluateConfig, ws: Workspace, model: ArtifactRef, data: ArtifactRef,
          labels: list[str], split: str, trust_remote_code: bool,
          adapter: ArtifactRef | None = None, base: ArtifactRef | None = None,
          quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate one model (base_model, merged_model, onnx_model, or an onnx_base with a
    fine-tune's onnx_adapter) on a prepared split; an adapter (with its `base` and the
    `quantization` it was trained with) is the QLoRA model as trained: the 4-bit base with the
    adapter on top, through bitsandbytes."""
    from slmflow.constrained import constrained_predictions
    from slmflow.fidelity import wilson_interval
    from slmflow.generate import BATCH_SIZE, generate_answers, label_probabilities, load_backend

    rows, sample = eval_rows(cfg, data, split)
    backend = load_backend(model, trust_remote_code, adapter=adapter, base=base,
                           quantization=quantization)
    tokenizer = backend.tokenizer
    longest = max(len(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels)
    max_new = min(cfg.max_new_tokens, longest + 1)
    # Per row, only its gold, free and constrained answers and latency stay in memory.
    gold, pred, constrained, latencies = [], [], [], []
    n_tokens, seconds, constrained_by, warm = 0, 0.0, "", False
    with open(ws.out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for chunk in _chunks(rows, CHUNK_ROWS):
            prompts = [tokenizer(row["prompt"])["input_ids"] for row in chunk]
            if not warm:
                backend.generate([prompts[0]], max_new)  # warm-up, not timed
                warm = True
            started = time.perf_counter()
            new, waited = generate_answers(backend.generate, prompts, max_new)
            seconds += time.perf_counter() - started
            latencies += waited
            probs = label_probabilities(backend, prompts, labels)
            chosen, constrained_by = constrained_predictions(backend, prompts, labels, probs, BATCH_SIZE)
            for row, tokens, p, c in zip(chunk, new, probs, chosen):
                n_tokens += len(tokens)
                answer = tokenizer.decode(tokens, skip_special_tokens=True)
                gold.append(row["label"])
                pred.append(parse_answer(answer, labels))
                constrained.append(c)
                f.write(json.dumps({"line": row["line"], "gold": row["label"], "pred": pred[-1],
                                    "pred_constrained": c, "answer": answer, "label_probs": {k: round(v, 6) for k, v in p.items()}},
                                   ensure_ascii=False) + "\n")
    if not gold:
        raise StageCheckError(f"evaluate: the {split} set has no rows to evaluate; check "
                              "evaluate.limit and the data")
    metrics = score(gold, pred, labels)
    correct = sum(g == p for g, p in zip(gold, pred))
    metrics.update(
        model_kind=model.kind,
        split=split,
        accuracy_ci95=[round(x, 4) for x in wilson_interval(correct, len(gold))],
        accuracy_constrained=sum(g == c for g, c in zip(gold, constrained)) / len(gold),
        constrained_by=constrained_by,
        latency_ms_p50=round(1000 * _percentile(latencies, 0.5), 2),
        latency_ms_p95=round(1000 * _percentile(latencies, 0.95), 2),
        tokens_per_second=round(n_tokens / max(seconds, 1e-9), 1),
        examples_per_second=round(len(gold) / max(seconds, 1e-9), 1),
        batch_size=BATCH_SIZE,
        # the trained QLoRA model is not shipped: no size; the separate form adds its adapter file
        size_bytes=(None if model.kind == "adapter" else
                    dir_size(backend.folder) + (adapter.meta["size_bytes"] if adapter else 0)),
    )
    if sample is not None:
        metrics["sample"] = sample
    if adapter is not None:  # the separate form: base + this adapter file
        metrics.update(adapter_bytes=adapter.meta["size_bytes"], model_kind="onnx_base+adapter")
    (ws.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    sampled = f" (a sample of {sample['rows']} of {sample['of']} rows)" if sample else ""
    ws.log(f"evaluate {metrics['model_kind']} on {split}{sampled}: accuracy {metrics['accuracy']:.3f}, "
           f"macro-F1 {metrics['macro_f1']:.3f}, constrained accuracy "
           f"{metrics['accuracy_constrained']:.3f} ({constrained_by}), p50 {metrics['latency_ms_p50']} ms")
    return metrics


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


STAGE = Stage(
    name="evaluate",
    kind="evaluation",
    # 3: the quality gate and the extra sets are no longer part of the key (changing the gate
    # re-evaluated every model); 4: label probabilities per row and a Wilson interval;
    # 5: constrained answers (accuracy_constrained, pred_constrained)
    version=5,
    inputs=("model", "data", "adapter", "base"),
    # left out of the key when absent: the other evaluations keep theirs. adapter: an onnx_base's
    # adapter file (export.adapters=separate); base: the base a QLoRA adapter (the model as
    # trained) sits on
    optional=("adapter", "base"),
    options={"labels": REQUIRED, "split": "eval", "trust_remote_code": False, "quantization": None},
    key_config=key_config,
    build=build,
)
