"""Constrained answers: every one a label.

An exported model generates inside a regular expression of the label set (onnxruntime-genai's
guidance, `slmflow.generate`); a PyTorch model answers the label its own scores rank first
(`label_probabilities`, the scoring the fidelity metrics use). The evaluation stage and
`slmflow.classifier` both use this module.
"""

from __future__ import annotations


def constrained_labels(answers: list[str], probs: list[dict[str, float]], labels: list[str]) -> list[str]:
    """The label of each guided answer; where the guidance stopped short of a whole label (the
    token budget ran out), the label the scores rank first, so the answer is always a label."""
    return [answer.strip() if answer.strip() in labels else max(labels, key=lambda lab: p[lab])
            for answer, p in zip(answers, probs)]


def guided_answers(backend, prompts: list[list[int]], labels: list[str], regex: str,
                   batch_size: int) -> list[list[int]]:
    """New tokens of each prompt, generated inside `regex` (equal-length batches, greedy). The
    token budget is the longest label in bytes + 1: guidance may spell a label in more tokens
    than the tokenizer would."""
    from slmflow.generate import generate_answers

    budget = max(len(lab.encode()) for lab in labels) + 1
    new, _ = generate_answers(lambda b, n: backend.guided(b, n, regex), prompts, budget, batch_size)
    return new


def constrained_predictions(backend, prompts: list[list[int]], labels: list[str],
                            probs: list[dict[str, float]], batch_size: int) -> tuple[list[str], str]:
    """Each row's constrained label and how it was chosen: "guidance" on an exported model
    (generation inside the labels' regex), "label_scores" on a PyTorch one (the label with the
    highest score: the fidelity metrics' scoring, as lm-eval's multiple choice; no generation
    loop or logits processor to keep in step with onnxruntime-genai's)."""
    from slmflow.generate import label_regex

    if backend.guided is None:
        return [max(labels, key=lambda lab: p[lab]) for p in probs], "label_scores"
    new = guided_answers(backend, prompts, labels, label_regex(labels), batch_size)
    answers = [backend.tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return constrained_labels(answers, probs, labels), "guidance"
