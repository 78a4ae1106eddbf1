"""The text template: which columns it names, and how a row becomes prompt + answer."""

from __future__ import annotations

import string
from collections.abc import Mapping


def template_fields(template: str) -> list[str]:
    """Field names of a `str.format` template, in order, without duplicates.

    Raises:
        ValueError: the template is not a valid format string, or uses positional fields.
    """
    fields: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError("positional fields like {} or {0} are not allowed; name a column")
        if name not in fields:
            fields.append(name)
    return fields


def split_template(template: str, label_column: str) -> tuple[str, str]:
    """Split a template at the label placeholder into (prompt template, suffix template).

    The prompt is what the model sees; the answer it learns is the label followed by the suffix
    (e.g. Phi-3's `<|end|>`).
    """
    marker = "{" + label_column + "}"
    head, sep, tail = template.partition(marker)
    if not sep:
        raise ValueError(f"template has no {marker} placeholder")
    return head, tail


def render_example(row: Mapping[str, object], template: str, label_column: str) -> dict[str, str]:
    """Render one row into `prompt`, `answer` (label + suffix) and the full `text`."""
    values = {k: "" if v is None else str(v) for k, v in row.items()}
    head, tail = split_template(template, label_column)
    prompt = head.format(**values)
    answer = values[label_column] + tail.format(**values)
    return {"prompt": prompt, "answer": answer, "text": prompt + answer}
