"""Use the model a run ships: `Classifier(OUTPUT_DIR/model)` answers with a label and a confidence.

    from slmflow import Classifier

    clf = Classifier("runs/default/model")          # loads the folder once
    clf("I can't stop smiling today").label          # 'Joy'
    clf.predict(["text one", "text two"])            # batched as the evaluation batches

Everything comes from the folder: the prompt template, the labels, the answer rule and the
guidance expression from its `slmflow_model.json` (`slmflow.modelcard`), the model and tokenizer
from onnxruntime-genai's files. Prompts are tokenized and generated exactly as the evaluation
stage does (`slmflow.generate`: equal-length prompts batched, greedy), so a free answer here is the
evaluation's answer for the same row.

- constrained (default): onnxruntime-genai's guidance keeps every generated token inside the
  regular expression of the label set, then EOS: the answer is always one of the labels.
- free (`constrained=False`): the greedy answer, read as the label it starts with (else
  "(other)"), as the evaluation reads it.

A folder of the separate form (`export.adapters: separate`, `slmflow bundle`) holds one base and
an adapter file per task, each with its own card: `Classifier(folder, adapter="tickets")` picks
one (default: the card's `adapters.default`), `clf.use("tones")` switches in the loaded model
(every adapter file is loaded once; a file exported for another base build is refused, one line).

The confidence is the label's probability from the model's own scores at the answer position,
normalised over the label set (`slmflow.generate.label_probabilities`: the label scoring the
fidelity metrics use); `probabilities` holds every label's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmflow.errors import SlmflowError


class InputError(SlmflowError):
    """A text the model's template cannot be filled with (exit 2 at the CLI, 422 at the server)."""


@dataclass(frozen=True)
class Prediction:
    """One answer: `label` (a label, or "(other)" for a free answer outside the set), its
    `confidence` (None for "(other)"), every label's probability, and the generated text."""

    label: str
    confidence: float | None
    probabilities: dict[str, float]
    answer: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Classifier:
    """A published slmflow model folder, loaded once; thread-safe (one prediction at a time).

    Args:
        path: OUTPUT_DIR/model of a finished run (ModelFolderError when it is not one, or was
            published by an older slmflow).
        constrained: the default mode of `__call__` and `predict`.
        batch_size: rows generated together (the evaluation's, `slmflow.generate.BATCH_SIZE`).
        adapter: in a folder with adapter files, the one to start with (default: the card's).
    """

    def __init__(self, path: str | Path, constrained: bool = True, batch_size: int | None = None,
                 adapter: str | None = None) -> None:
        from slmflow.generate import BATCH_SIZE, onnx_backend
        from slmflow.modelcard import ModelFolderError, adapter_files, read_card

        self.path = Path(path)
        self.folder_card = read_card(self.path)
        files = adapter_files(self.path, self.folder_card)  # {} for a merged model
        self.adapters: list[str] = list(files)
        self.constrained = constrained
        self.batch_size = batch_size or BATCH_SIZE
        try:
            self.backend = onnx_backend(self.path, files or None)
        except Exception as exc:  # noqa: BLE001 - a folder onnxruntime-genai cannot load
            raise ModelFolderError(f"{self.path}: onnxruntime-genai cannot load the model "
                                   f"({' '.join(str(exc).split())})") from None
        self._lock = threading.Lock()
        self.adapter: str | None = None
        self._card(self.folder_card)
        if files:
            self.use(adapter or self.folder_card["adapters"]["default"])
        elif adapter is not None:
            raise ModelFolderError(f"{self.path} holds one merged model, no adapter {adapter!r}")

    def _card(self, card: dict[str, Any]) -> None:
        self.card = card
        self.labels: list[str] = list(card["labels"])
        self.input_columns: list[str] = list(card["input_columns"])
        tok = self.backend.tokenizer
        longest = max(len(tok(lab, add_special_tokens=False)["input_ids"]) for lab in self.labels)
        self.max_new_tokens = min(int(card["max_new_tokens"]), longest + 1)  # as evaluate

    def use(self, adapter: str) -> None:
        """Answer with this adapter (and its task's card) from now on, in the loaded model."""
        from slmflow.modelcard import ModelFolderError

        if adapter not in self.adapters:
            raise ModelFolderError(f"{self.path} has no adapter {adapter!r}; it has "
                                   f"{', '.join(self.adapters) or 'none'}")
        with self._lock:
            self.backend.use_adapter(adapter)
            self._card(self.folder_card["adapters"]["files"][adapter]["card"])
            self.adapter = adapter

    def prompt(self, item: str | Mapping[str, Any]) -> str:
        """The prompt of one text (a string fills the template's single column; a mapping gives
        each of `input_columns`)."""
        if isinstance(item, str):
            if len(self.input_columns) != 1:
                raise InputError(f"this model's template takes columns {self.input_columns}: give "
                                 "each text as an object with those keys")
            values = {self.input_columns[0]: item}
        elif isinstance(item, Mapping):
            missing = [c for c in self.input_columns if c not in item]
            if missing:
                raise InputError(f"a text lacks column(s) {missing}; this model's template takes "
                                 f"{self.input_columns}")
            values = {c: "" if item[c] is None else str(item[c]) for c in self.input_columns}
        else:
            raise InputError(f"a text must be a string or an object with {self.input_columns}, "
                             f"got {type(item).__name__}")
        return self.card["prompt_template"].format(**values)

    def __call__(self, text: str | Mapping[str, Any], constrained: bool | None = None) -> Prediction:
        return self.predict([text], constrained)[0]

    def predict(self, texts: Iterable[str | Mapping[str, Any]], constrained: bool | None = None,
                progress: Callable[[int], None] | None = None, chunk: int = 256) -> list[Prediction]:
        """One Prediction per text, in order. `progress(n)` is told after each chunk of rows."""
        prompts = [self.prompt(t) for t in texts]
        constrained = self.constrained if constrained is None else constrained
        out: list[Prediction] = []
        for start in range(0, len(prompts), chunk):
            out += self._predict(prompts[start:start + chunk], constrained)
            if progress:
                progress(len(prompts[start:start + chunk]))
        return out

    def _predict(self, prompts: list[str], constrained: bool) -> list[Prediction]:
        from slmflow.constrained import constrained_labels, guided_answers
        from slmflow.generate import generate_answers, label_probabilities
        from slmflow.stages.evaluate import parse_answer

        tok = self.backend.tokenizer
        ids = [tok(p)["input_ids"] for p in prompts]  # as the evaluation tokenizes its prompts
        with self._lock:
            if constrained:
                new = guided_answers(self.backend, ids, self.labels, self.card["guidance"]["data"],
                                     self.batch_size)
            else:
                new, _ = generate_answers(self.backend.generate, ids, self.max_new_tokens,
                                          self.batch_size)
            probs = label_probabilities(self.backend, ids, self.labels)
        answers = [tok.decode(t, skip_special_tokens=True) for t in new]
        labels = (constrained_labels(answers, probs, self.labels) if constrained
                  else [parse_answer(a, self.labels) for a in answers])
        return [Prediction(label, p.get(label), p, answer)
                for label, p, answer in zip(labels, probs, answers)]

