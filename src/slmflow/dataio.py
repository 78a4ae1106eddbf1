"""Read a labelled dataset and check it, with errors that name the file, line and column."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from slmflow.config import DataConfig
from slmflow.errors import DataError
from slmflow.inputs import resolve_path

Row = dict[str, Any]


def _read_jsonl(path: Path, text: str) -> list[tuple[int, Row]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}:{exc.colno}: broken JSON line: {exc.msg}; fix or remove line {lineno}"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: each line must be a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows


def _read_json_array(path: Path, text: str) -> list[tuple[int, Row]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}; fix the JSON there "
            "(or write one object a line as .jsonl)"
        ) from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: a .json dataset must be a list of objects or JSON lines")
    return [(i + 1, r) for i, r in enumerate(data)]  # "line" = item number in an array


def _read_hf(spec: str, hf_split: str) -> list[tuple[int, Row]]:
    import datasets

    try:
        ds = datasets.load_dataset(spec[3:], split=hf_split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad split: its message says
        raise DataError(f"{spec}: could not load the dataset: {exc}") from None
    return [(i + 1, dict(r)) for i, r in enumerate(ds)]


def _read_parquet(path: Path) -> list[tuple[int, Row]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any read failure means "not parquet"
        raise DataError(f"{path}: not a readable parquet file: {exc}") from None
    return [(i + 1, r) for i, r in enumerate(table.to_pylist())]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(
            f"{path}: the data file is empty; write the rows (one JSON object a line) or point "
            "data.train_file / data.eval_file at another file"
        )
    return text


def read_rows(spec: str, hf_split: str = "train") -> tuple[Path | str, list[tuple[int, Row]]]:
    """Rows of a dataset file as (line number, row); line is the data row number for CSV/parquet."""
    if spec.startswith("hf:"):
        return spec, _read_hf(spec, hf_split)
    try:
        path = resolve_path(spec)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None
    if not path.exists():
        raise DataError(f"{path}: data file does not exist: check data.train_file / data.eval_file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; name a .jsonl, .json, .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return path, _read_parquet(path)
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"{path}: unsupported data format {suffix!r}; use .jsonl, .json, .csv or .parquet")
    text = _read_text(path)
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        return path, [(i + 2, dict(r)) for i, r in enumerate(reader)]  # line 1 is the header
    if suffix == ".json" and text.lstrip().startswith("["):
        return path, _read_json_array(path, text)
    return path, _read_jsonl(path, text)


def load_examples(spec: str, cfg: DataConfig) -> list[Row]:
    """Read and check a dataset: every template column present, every label in the label set."""
    where, rows = read_rows(spec, cfg.hf_split)
    if not rows:
        raise DataError(f"{where}: the data file has no rows; add rows or point data.train_file / "
                        "data.eval_file at another file")
    needed = list(dict.fromkeys([*cfg.text_columns, cfg.label_column]))
    labels = set(cfg.labels)
    examples = []
    for lineno, row in rows:
        missing = [c for c in needed if c not in row]
        if missing:
            have = ", ".join(sorted(row)) or "none"
            raise DataError(
                f"{where}:{lineno}: missing column {missing[0]!r} (columns there: {have}); "
                f"fix the data or data.text_columns / data.label_column"
            )
        for col in needed:
            if row[col] is None or not str(row[col]).strip():
                raise DataError(f"{where}:{lineno}: column {col!r} is empty")
        label = str(row[cfg.label_column]).strip()
        if label not in labels:
            raise DataError(
                f"{where}:{lineno}: label {label!r} in column {cfg.label_column!r} is not in "
                f"data.labels {cfg.labels}; fix the row or add the label to data.labels"
            )
        examples.append({c: str(row[c]).strip() for c in needed} | {"_line": lineno})
    return examples
