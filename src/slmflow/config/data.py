"""The data section (`data.*`): the labelled dataset and how it becomes training text."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from slmflow.config.base import BUNDLED_TONES, SEED_TEMPLATE, PathSpec, _Config


class DataConfig(_Config):
    """The labelled dataset and how it becomes training text."""

    train_file: PathSpec = Field(
        BUNDLED_TONES,
        title="Training data",
        description="A .json/.jsonl/.csv/.parquet file, 'pkg:MODULE/FILE', 'hf:NAME' for a "
        "`datasets` dataset, or an AzureML datastore file azureml://datastores/D/paths/P. "
        "Relative paths are read from the working directory.",
        min_length=1,
    )
    eval_file: PathSpec | None = Field(
        None,
        title="Evaluation data",
        description="Optional held-out file in the same format; without it, eval_split of the "
        "training data is held out.",
    )
    hf_split: str = Field("train", title="Dataset split", description="Split for hf: datasets.")
    text_columns: list[str] = Field(
        ["phrase", "tone"],
        title="Text columns",
        description="Columns the template uses; each must exist in the data.",
        min_length=1,
    )
    text_template: str = Field(
        SEED_TEMPLATE,
        title="Text template",
        description="Python format string over the text columns. The label column's placeholder "
        "marks where the answer starts: the text before it is the prompt.",
    )
    label_column: str = Field("tone", title="Label column", description="The answer column.")
    labels: list[str] = Field(
        ["Sad", "Joy", "Fear", "Surprise"],
        title="Labels",
        description="The label set; a row with another label is an error.",
        min_length=2,
    )
    eval_split: float = Field(
        0.3,
        gt=0.0,
        lt=1.0,
        title="Eval split",
        description="Fraction held out for evaluation when no eval_file is given (seed: 0.3).",
    )
    validation_split: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        title="Validation split",
        description="Fraction of the training data's rows held out (stratified, like eval_split) "
        "as a validation set: the rows export.recipe=auto chooses a recipe on, so that the eval "
        "split and the extra sets are used for no choice. 0: none (the search chooses on the "
        "gate's set, and the report says so).",
    )
    max_seq_len: int = Field(
        256, ge=16, le=32768, title="Max sequence length", description="Longer rows are an error."
    )
    seed: int = Field(42, title="Data seed", description="Seed of the train/eval split.")
    corpus_strategy: Literal["line_by_line", "join"] = Field(
        "line_by_line",
        title="Corpus strategy",
        description="How training rows become examples. line_by_line: one example per row, loss "
        "per finetune.loss_on. join (Olive's): the rendered rows, each ended by EOS, are "
        "concatenated and cut into chunks of max_seq_len tokens (at most the model's context), "
        "loss on every token. Evaluation rows stay one per row.",
    )

    @field_validator("train_file", "eval_file")
    @classmethod
    def _datastore_shape(cls, spec: str | None, info) -> str | None:
        if spec and spec.startswith("azureml:"):
            from slmflow.errors import SlmflowError
            from slmflow.uris import parse_datastore_path

            try:
                parse_datastore_path(spec, f"data.{info.field_name}")
            except SlmflowError as exc:  # pydantic needs a ValueError
                raise ValueError(str(exc)) from None
        return spec

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels) or any(not label.strip() for label in labels):
            raise ValueError("labels must be distinct and non-empty, e.g. [Sad, Joy, Fear, Surprise]")
        return labels

    @model_validator(mode="after")
    def _splits_leave_training_rows(self) -> DataConfig:
        if self.eval_file is None and self.eval_split + self.validation_split >= 0.9:
            raise ValueError(
                f"data.eval_split ({self.eval_split}) + data.validation_split "
                f"({self.validation_split}) hold out {self.eval_split + self.validation_split:.0%} "
                "of the rows: keep their sum below 0.9 so that rows are left to train on")
        return self

    @model_validator(mode="after")
    def _template_uses_columns(self) -> DataConfig:
        from slmflow.textformat import template_fields

        try:
            fields = template_fields(self.text_template)
        except ValueError as exc:
            raise ValueError(f"data.text_template is not a valid format string: {exc}") from None
        unknown = [f for f in fields if f not in self.text_columns]
        if unknown:
            raise ValueError(
                f"data.text_template names {unknown} which are not in data.text_columns "
                f"{self.text_columns}: add them to text_columns or fix the template"
            )
        if self.label_column not in fields:
            raise ValueError(
                f"data.text_template must contain the label column placeholder "
                f"{{{self.label_column}}}: it marks where the answer starts"
            )
        return self
