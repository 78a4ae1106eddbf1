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
one (default: the card's `adapters.default`), `clf.use("tones")` switches in the loaded model,
`clf.predict(texts, adapter="tickets")` answers one call with another (every adapter file is
loaded once; a file exported for another base build is refused, one line; an unknown name is
refused naming the folder's).

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


class UnknownAdapterError(SlmflowError):
    """An adapter name the folder does not hold (exit 2 at the CLI, 422 at the server); the
    message names the ones it holds."""


@dataclass(frozen=True)
class Task:
    """What one adapter of a folder (or its one merged model: `adapter` None) answers: its card
    (prompt template, guidance), text columns, labels and token budget."""

    adapter: str | None
    card: dict[str, Any]
    labels: list[str]
    input_columns: list[str]
    max_new_tokens: int


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

    `predict(..., adapter=NAME)` answers one call with that adapter whatever `use` chose: the
    switch and the generation happen under one lock, so concurrent callers (the server's
    requests) each get their own adapter's answers.
    """

    def __init__(self, path: str | Path, constrained: bool = True, batch_size: int | None = None,
                 adapter: str | None = None) -> None:
        from slmflow.generate import BATCH_SIZE, onnx_backend
        from slmflow.modelcard import ModelFolderError, adapter_files, read_card

        self.path = Path(path)
        self.folder_card = read_card(self.path)
        files = adapter_files(self.path, self.folder_card)  # {} for a merged model
        self.adapters: list[str] = list(files)
        self.default_adapter: str | None = self.folder_card["adapters"]["default"] if files else None
        self.constrained = constrained
        self.batch_size = batch_size or BATCH_SIZE
        try:
            self.backend = onnx_backend(self.path, files or None)
        except Exception as exc:  # noqa: BLE001 - a folder onnxruntime-genai cannot load
            raise ModelFolderError(f"{self.path}: onnxruntime-genai cannot load the model "
                                   f"({' '.join(str(exc).split())})") from None
        self._lock = threading.Lock()
        cards = ({name: self.folder_card["adapters"]["files"][name]["card"] for name in files}
                 if files else {None: self.folder_card})
        self.tasks: dict[str | None, Task] = {name: self._task(name, card)
                                              for name, card in cards.items()}
        self.adapter: str | None = None
        self._show(self.tasks[self.default_adapter])
        if adapter is not None:
            self.use(adapter)

    def _task(self, name: str | None, card: dict[str, Any]) -> Task:
        labels = list(card["labels"])
        tok = self.backend.tokenizer
        longest = max(len(tok(lab, add_special_tokens=False)["input_ids"]) for lab in labels)
        return Task(name, card, labels, list(card["input_columns"]),
                    min(int(card["max_new_tokens"]), longest + 1))  # as evaluate

    def _show(self, task: Task) -> None:
        """The task in use, as attributes (`card`, `labels`, `input_columns`, `max_new_tokens`)."""
        self.adapter, self.card, self.labels = task.adapter, task.card, task.labels
        self.input_columns, self.max_new_tokens = task.input_columns, task.max_new_tokens

    def task(self, adapter: str | None = None) -> Task:
        """The task `adapter` answers (None: the one in use); an unknown name is refused naming
        the folder's."""
        if adapter is None:
            return self.tasks[self.adapter]
        if adapter not in self.adapters:
            held = (f"it has {', '.join(self.adapters)}" if self.adapters
                    else "it holds one merged model, no adapter files")
            raise UnknownAdapterError(f"{self.path} has no adapter {adapter!r}; {held}")
        return self.tasks[adapter]

    def use(self, adapter: str) -> None:
        """Answer with this adapter (and its task's card) from now on, in the loaded model."""
        task = self.task(adapter)
        with self._lock:
            self.backend.use_adapter(adapter)
            self._show(task)

    def prompt(self, item: str | Mapping[str, Any], task: Task | None = None) -> str:
        """The prompt of one text for `task` (default: the one in use): a string fills the
        template's single column; a mapping gives each of `input_columns`."""
        card, columns = (self.card, self.input_columns) if task is None else (task.card, task.input_columns)
        if isinstance(item, str):
            if len(columns) != 1:
                raise InputError(f"this model's template takes columns {columns}: give "
                                 "each text as an object with those keys")
            values = {columns[0]: item}
        elif isinstance(item, Mapping):
            missing = [c for c in columns if c not in item]
            if missing:
                raise InputError(f"a text lacks column(s) {missing}; this model's template takes "
                                 f"{columns}")
            values = {c: "" if item[c] is None else str(item[c]) for c in columns}
        else:
            raise InputError(f"a text must be a string or an object with {columns}, "
                             f"got {type(item).__name__}")
        return card["prompt_template"].format(**values)

    def __call__(self, text: str | Mapping[str, Any], constrained: bool | None = None,
                 adapter: str | None = None) -> Prediction:
        return self.predict([text], constrained, adapter=adapter)[0]

    def predict(self, texts: Iterable[str | Mapping[str, Any]], constrained: bool | None = None,
                progress: Callable[[int], None] | None = None, chunk: int = 256,
                adapter: str | None = None) -> list[Prediction]:
        """One Prediction per text, in order, by `adapter` (default: the one in use).
        `progress(n)` is told after each chunk of rows."""
        task = self.task(adapter)  # read once: a concurrent `use` changes no answer of this call
        prompts = [self.prompt(t, task) for t in texts]
        constrained = self.constrained if constrained is None else constrained
        out: list[Prediction] = []
        for start in range(0, len(prompts), chunk):
            out += self._predict(prompts[start:start + chunk], constrained, task)
            if progress:
                progress(len(prompts[start:start + chunk]))
        return out

    def _predict(self, prompts: list[str], constrained: bool, task: Task) -> list[Prediction]:
        from slmflow.constrained import constrained_labels, guided_answers
        from slmflow.generate import generate_answers, label_probabilities
        from slmflow.stages.evaluate import parse_answer

        tok = self.backend.tokenizer
        ids = [tok(p)["input_ids"] for p in prompts]  # as the evaluation tokenizes its prompts
        with self._lock:  # the adapter is set with the generation: no other call between them
            if task.adapter is not None:
                self.backend.use_adapter(task.adapter)
            if constrained:
                new = guided_answers(self.backend, ids, task.labels, task.card["guidance"]["data"],
                                     self.batch_size)
            else:
                new, _ = generate_answers(self.backend.generate, ids, task.max_new_tokens,
                                          self.batch_size)
            probs = label_probabilities(self.backend, ids, task.labels)
            if task.adapter is not None and self.adapter != task.adapter:  # `use`'s choice back
                self.backend.use_adapter(self.adapter)
        answers = [tok.decode(t, skip_special_tokens=True) for t in new]
        labels = (constrained_labels(answers, probs, task.labels) if constrained
                  else [parse_answer(a, task.labels) for a in answers])
        return [Prediction(label, p.get(label), p, answer)
                for label, p, answer in zip(labels, probs, answers)]

