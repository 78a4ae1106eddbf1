"""evaluate.max_examples: a stratified, seeded sample, read as a stream, recorded; and the
evaluation answering a set in chunks gives what it gives in one."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from slmflow.artifacts import ArtifactRef
from slmflow.config import EvaluateConfig
from slmflow.configio import build_config
from slmflow.errors import ConfigError
from slmflow.sampling import allocate, stratified_sample
from slmflow.stages import evaluate

LABELS = ["Fear", "Joy", "Sad", "Surprise"]


def _rows(n_by_label: dict[str, int]) -> list[dict]:
    rows, line = [], 1
    for i in range(max(n_by_label.values())):
        for label, n in n_by_label.items():
            if i < n:
                rows.append({"line": line, "label": label, "prompt": f"{label} {line}"})
                line += 1
    return rows


def test_allocation_keeps_each_labels_share_and_the_size():
    assert allocate({"a": 50, "b": 30, "c": 20}, 10) == {"a": 5, "b": 3, "c": 2}
    assert allocate({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}  # ties: label order
    assert allocate({"a": 7, "b": 2}, 100) == {"a": 7, "b": 2}  # more asked than there is
    got = allocate({"a": 333, "b": 333, "c": 334}, 100)
    assert sum(got.values()) == 100 and all(33 <= v <= 34 for v in got.values())


def test_sample_is_stratified_seeded_and_independent_of_row_order():
    rows = _rows({"Fear": 400, "Joy": 200, "Sad": 100, "Surprise": 100})
    sample, record = stratified_sample(lambda: iter(rows), 80, seed=0)
    assert Counter(r["label"] for r in sample) == {"Fear": 40, "Joy": 20, "Sad": 10, "Surprise": 10}
    assert record == {"rows": 80, "of": 800, "seed": 0,
                      "labels": {"Fear": 40, "Joy": 20, "Sad": 10, "Surprise": 10}}
    assert [r["line"] for r in sample] == sorted(r["line"] for r in sample)  # the set's order
    again, _ = stratified_sample(lambda: iter(rows), 80, seed=0)
    assert again == sample
    reversed_rows = rows[::-1]
    backwards, _ = stratified_sample(lambda: iter(reversed_rows), 80, seed=0)
    assert {r["line"] for r in backwards} == {r["line"] for r in sample}
    other, _ = stratified_sample(lambda: iter(rows), 80, seed=1)
    assert {r["line"] for r in other} != {r["line"] for r in sample}
    everything, record = stratified_sample(lambda: iter(rows), 5000, seed=0)
    assert everything == rows and record["rows"] == record["of"] == 800


def _dataset(tmp_path: Path, rows: list[dict]) -> ArtifactRef:
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ArtifactRef(kind="dataset", uri=str(tmp_path), sha256="0" * 64, key="k")


def test_eval_rows_applies_limit_then_the_sample(tmp_path):
    data = _dataset(tmp_path, _rows({"Joy": 30, "Sad": 30}))
    rows, sample = evaluate.eval_rows(EvaluateConfig(), data, "eval")
    assert sample is None and len(list(rows)) == 60
    rows, sample = evaluate.eval_rows(EvaluateConfig(limit=20, max_examples=6), data, "eval")
    assert len(rows) == 6 and max(r["line"] for r in rows) <= 20
    assert sample == {"rows": 6, "of": 20, "seed": 0, "labels": {"Joy": 3, "Sad": 3}}


def test_max_examples_is_validated_and_keys_only_when_set():
    with pytest.raises(ConfigError, match=r"evaluate\.max_examples: Input should be greater than or equal to 1"):
        build_config({"evaluate": {"max_examples": 0}})
    with pytest.raises(ConfigError, match=r"evaluate\.max_exampels: unknown key; did you mean 'max_examples'\?"):
        build_config({"evaluate": {"max_exampels": 10}})
    plain = evaluate.key_config(EvaluateConfig(), LABELS, "eval")
    assert "max_examples" not in plain["evaluate"] and "sample_seed" not in plain["evaluate"]
    assert evaluate.key_config(EvaluateConfig(sample_seed=3), LABELS, "eval") == plain
    sampled = evaluate.key_config(EvaluateConfig(max_examples=10), LABELS, "eval")
    assert sampled["evaluate"]["max_examples"] == 10
    assert sampled != evaluate.key_config(EvaluateConfig(max_examples=10, sample_seed=1), LABELS, "eval")


class _Tokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(text) % 5 + 1] * (1 + len(text) % 3)}

    def decode(self, tokens, skip_special_tokens=True):
        return LABELS[tokens[0] % len(LABELS)] if tokens else ""


class _Backend:
    """Answers a label from the prompt's first token; scores labels the same way."""

    guided = None

    def __init__(self, folder: Path) -> None:
        self.tokenizer, self.folder, self.rows_generated = _Tokenizer(), folder, 0
        self.most_scored = 0  # the most prompts held at once (a chunk)

    def generate(self, prompts, max_new):
        self.rows_generated += len(prompts)
        return [[p[0]] for p in prompts]

    def score_labels(self, prompts, label_ids):
        self.most_scored = max(self.most_scored, len(prompts))
        return [[1.0 if i == p[0] % len(LABELS) else 0.0 for i in range(len(LABELS))] for p in prompts]


def _evaluate(monkeypatch, tmp_path: Path, name: str, cfg: EvaluateConfig, data: ArtifactRef):
    out = tmp_path / name
    out.mkdir()
    backend = _Backend(tmp_path)
    monkeypatch.setattr("slmflow.generate.load_backend", lambda model, trust, **_: backend)
    model = ArtifactRef(kind="merged_model", uri=str(tmp_path), sha256="1" * 64, key="m")
    ws = SimpleNamespace(out=out, log=lambda m: None)
    metrics = evaluate.build(cfg, ws, model, data, LABELS, "eval", False)
    return metrics, (out / "predictions.jsonl").read_text(), backend


def test_chunks_answer_as_one_pass_and_a_sample_is_recorded(monkeypatch, tmp_path):
    (tmp_path / "data").mkdir()
    data = _dataset(tmp_path / "data", _rows({"Fear": 20, "Joy": 15, "Sad": 10, "Surprise": 5}))
    whole, whole_rows, _ = _evaluate(monkeypatch, tmp_path, "whole", EvaluateConfig(), data)
    monkeypatch.setattr(evaluate, "CHUNK_ROWS", 7)  # 50 rows in 8 chunks
    chunked, chunked_rows, backend = _evaluate(monkeypatch, tmp_path, "chunked", EvaluateConfig(), data)
    assert chunked_rows == whole_rows and len(whole_rows.splitlines()) == 50
    assert backend.most_scored == 7  # never more than a chunk's prompts at once
    same = ("accuracy", "macro_f1", "confusion", "n", "accuracy_constrained", "accuracy_ci95")
    assert {k: chunked[k] for k in same} == {k: whole[k] for k in same}
    assert "sample" not in whole
    sampled, sampled_rows, backend = _evaluate(monkeypatch, tmp_path, "sampled",
                                               EvaluateConfig(max_examples=10, sample_seed=4), data)
    assert sampled["n"] == 10 and len(sampled_rows.splitlines()) == 10
    assert backend.rows_generated == 10 + 1  # the sample and the warm-up row, nothing else
    assert sampled["sample"] == {"rows": 10, "of": 50, "seed": 4,
                                 "labels": {"Fear": 4, "Joy": 3, "Sad": 2, "Surprise": 1}}
