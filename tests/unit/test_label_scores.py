"""Label scores on the tiny Phi-3: the batched PyTorch scorer gives what each row alone gives,
the exported model's scorer agrees with PyTorch in fp32, and the probabilities are a distribution."""

from __future__ import annotations

import pytest

LABELS = ["Sad", "Joy", "Fear", "Surprise"]
PROMPTS = ["### Text: The dog ran off.\n### The tone is:\n", "### Text: We won!\n### The tone is:\n",
           "### Text: A letter came, unsigned, with a key inside.\n### The tone is:\n"]


def test_batched_label_scores_equal_each_row_alone(tiny_model):
    from slmflow.generate import torch_backend

    backend = torch_backend(tiny_model)
    ids = [backend.tokenizer(p)["input_ids"] for p in PROMPTS]
    labels = [backend.tokenizer(lab, add_special_tokens=False)["input_ids"]
              for lab in [*LABELS, "Surprise, then Joy"]]
    assert len(labels[-1]) > 2  # a multi-token label is scored too
    together = backend.score_labels(ids, labels)
    alone = [backend.score_labels([p], labels)[0] for p in ids]
    assert [s for row in together for s in row] == pytest.approx([s for row in alone for s in row], abs=1e-4)


def test_the_distribution_over_labels_sums_to_one(tiny_model):
    from slmflow.fidelity import normalized
    from slmflow.generate import torch_backend

    backend = torch_backend(tiny_model)
    ids = [backend.tokenizer(p)["input_ids"] for p in PROMPTS]
    labels = [backend.tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in LABELS]
    for scores in backend.score_labels(ids, labels):
        probs = normalized(dict(zip(LABELS, scores)))
        assert sum(probs.values()) == pytest.approx(1.0) and min(probs.values()) >= 0
