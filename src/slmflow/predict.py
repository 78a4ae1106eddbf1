"""`slmflow predict`: label texts, or a file of them, with a published model folder.

Run as:
    slmflow predict --model runs/default/model "I can't stop smiling" "Where is my cat?"
    slmflow predict --model runs/default/model --input rows.jsonl --output answers.jsonl [--free]

Each answer is one JSON line: the row's columns (from a file), `label`, `confidence`,
`probabilities`, `answer`. With `--input` (.jsonl or .csv with the model's text columns) a
progress bar runs on stderr (tqdm when installed, else a counter) and the last line says how many
examples per second. A bad folder, file or column exits 2 with one line.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmflow.errors import DataError


def read_texts(path: str | Path, columns: list[str]) -> list[dict[str, Any]]:
    """The rows of a .jsonl or .csv file, each holding every one of `columns`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the input as UTF-8 text ({exc})") from None
    rows: list[dict[str, Any]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        raise DataError(f"{path}: unsupported input format {path.suffix!r}; use .jsonl or .csv")
    if not rows:
        raise DataError(f"{path}: the input file has no rows")
    for n, row in enumerate(rows, 1):
        missing = [c for c in columns if c not in row or row[c] is None]
        if missing:
            raise DataError(f"{path}: row {n} lacks column(s) {missing}; the model's template "
                            f"takes {columns}")
    return rows


def _progress(total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    try:
        from tqdm import tqdm
    except ImportError:  # a plain counter
        done = [0]

        def step(n: int) -> None:
            done[0] += n
            print(f"\r{done[0]}/{total} rows", end="", file=sys.stderr, flush=True)

        return step, lambda: print(file=sys.stderr)
    bar = tqdm(total=total, unit="row", file=sys.stderr)
    return bar.update, bar.close


def run_predict(model: str, texts: list[str], input_file: str | None, output: str | None,
                free: bool, adapter: str | None = None) -> int:
    """The `slmflow predict` command (errors raise SlmflowError: one line, exit 2)."""
    from slmflow.classifier import Classifier
    from slmflow.errors import ConfigError

    if not texts and not input_file:
        raise ConfigError("predict: give texts to label, or --input FILE")
    if texts and input_file:
        raise ConfigError("predict: give texts or --input FILE, not both")
    clf = Classifier(model, constrained=not free, adapter=adapter)
    if input_file:
        rows: list[Any] = read_texts(input_file, clf.input_columns)
        step, close = _progress(len(rows))
    else:
        rows, step, close = list(texts), None, lambda: None
    try:
        out = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
    except OSError as exc:
        raise DataError(f"{output}: cannot write the answers ({exc.strerror})") from None
    try:
        start = time.perf_counter()
        preds = clf.predict(rows, progress=step)
        seconds = time.perf_counter() - start
        close()
        for row, pred in zip(rows, preds):
            record = (dict(row) if isinstance(row, dict) else {"text": row}) | pred.to_dict()
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if output:
            out.close()
    if input_file:
        print(f"{len(rows)} rows in {seconds:.2f} s: {len(rows) / max(seconds, 1e-9):.1f} "
              f"examples/s ({'free' if free else 'constrained'})"
              + (f"; answers in {output}" if output else ""), file=sys.stderr)
    return 0
