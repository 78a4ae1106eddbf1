"""The published model's card, the Classifier's prompts and constrained labels, `slmflow predict`'s
bad inputs and the HTTP endpoint's answers: no model loaded (a fake classifier where one is needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slmflow.configio import load_config
from slmflow.modelcard import CARD, ModelFolderError, build_card, read_card, write_card

LABELS = ["Sad", "Joy", "Fear", "Surprise"]


def _folder(tmp_path: Path, card: dict | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "genai_config.json").write_text("{}")
    if card is not None:
        (folder / CARD).write_text(json.dumps(card))
    return folder


def test_card_says_how_the_evaluation_prompted_and_read_answers(tmp_path):
    config = load_config(None, [])
    card = build_card(config)
    assert card["prompt_template"] == "### Text: {phrase}\n### The tone is:\n"
    assert card["input_columns"] == ["phrase"] and card["labels"] == LABELS
    assert card["guidance"] == {"type": "regex", "data": "(Sad|Joy|Fear|Surprise)"}
    assert card["max_new_tokens"] == config.evaluate.max_new_tokens
    folder = _folder(tmp_path)
    write_card(folder, config.model_dump(mode="json"))  # as publish_model writes it
    assert read_card(folder) == card


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "does not exist"),
    ("no_genai", "no genai_config.json"),
    ("no_card", "published by an older slmflow"),
    ("bad_json", "not valid JSON"),
    ("newer", "upgrade slmflow"),
    ("other", "not an slmflow model card"),
])
def test_a_folder_that_is_not_a_usable_model_says_why(tmp_path, setup, message):
    card = build_card(load_config(None, []))
    if setup == "missing":
        folder = tmp_path / "nowhere"
    elif setup == "no_genai":
        folder = tmp_path
    else:
        folder = _folder(tmp_path, None if setup in ("no_card", "bad_json") else card)
    if setup == "bad_json":
        (folder / CARD).write_text("{")
    elif setup == "newer":
        (folder / CARD).write_text(json.dumps(card | {"format_version": 99}))
    elif setup == "other":
        (folder / CARD).write_text(json.dumps({"format": "else"}))
    with pytest.raises(ModelFolderError, match=re.escape(message)):
        read_card(folder)


def test_label_regex_escapes_what_regex_reads_as_syntax():
    from slmflow.generate import label_regex

    assert label_regex(["a.b", "c|d", "(x)"]) == r"(a\.b|c\|d|\(x\))"
    assert re.fullmatch(label_regex(["a.b", "c|d"]), "c|d") and not re.fullmatch(
        label_regex(["a.b"]), "axb")


def test_constrained_label_is_always_in_the_set():
    from slmflow.constrained import constrained_labels

    probs = [{"Sad": 0.1, "Joy": 0.2, "Fear": 0.6, "Surprise": 0.1}] * 3
    # a whole label; a guided answer cut short by the token budget; nothing: the top score
    assert constrained_labels(["Joy", "Surp", ""], probs, LABELS) == ["Joy", "Fear", "Fear"]


def _fake_classifier(columns=("phrase",), adapters: dict[str, list[str]] | None = None):
    """No model: the prompt and the server's plumbing only. `adapters`: {name: labels} of a
    folder with adapter files (the first the default); none: one merged model."""
    from slmflow.classifier import Classifier, Prediction, Task

    clf = object.__new__(Classifier)
    card = {"prompt_template": "### Text: {phrase}\n### The tone is:\n"}
    clf.tasks = {name: Task(name, card, labels, list(columns), 4)
                 for name, labels in (adapters or {None: LABELS}).items()}
    clf.adapters = list(adapters or [])
    clf.default_adapter = clf.adapters[0] if clf.adapters else None
    clf.path = Path("m")
    clf._show(clf.tasks[clf.default_adapter])
    calls = []

    def predict(texts, constrained=None, progress=None, adapter=None):
        task = clf.task(adapter)  # the real lookup: unknown names refused as the real one does
        prompts = [clf.prompt(t, task) for t in texts]
        calls.append((len(prompts), constrained, adapter))
        probs = dict(zip(task.labels, (0.4, 0.3, 0.2, 0.1)))
        return [Prediction(task.labels[0], 0.4, probs, task.labels[0]) for _ in prompts]

    clf.predict, clf.calls = predict, calls
    return clf


def test_prompt_fills_the_template_from_a_string_or_the_columns():
    from slmflow.classifier import InputError

    clf = _fake_classifier()
    assert clf.prompt("hi") == "### Text: hi\n### The tone is:\n"
    assert clf.prompt({"phrase": "hi", "tone": "x"}) == "### Text: hi\n### The tone is:\n"
    with pytest.raises(InputError, match=r"lacks column\(s\) \['phrase'\]"):
        clf.prompt({"text": "hi"})
    with pytest.raises(InputError, match="string or an object"):
        clf.prompt(3)


def test_serve_answers_one_a_list_and_refuses_bad_requests():
    from fastapi.testclient import TestClient

    from slmflow.serve import MAX_TEXTS, create_app

    clf = _fake_classifier()
    client = TestClient(create_app(clf))
    assert client.get("/health").json() == {"status": "ok", "labels": LABELS, "model": "m",
                                            "adapters": {}, "default_adapter": None}
    one = client.post("/classify", json={"text": "hi"})
    assert one.status_code == 200 and one.json()["label"] == "Sad"
    many = client.post("/classify", json={"texts": ["a", "b"], "constrained": False})
    assert many.status_code == 200 and len(many.json()["predictions"]) == 2
    assert clf.calls[-1] == (2, False, None)
    assert "adapter" not in one.json() and "adapter" not in many.json()
    for body, code, words in [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({}).encode(), 422, "exactly one of"),
        (json.dumps({"text": "a", "texts": ["b"]}).encode(), 422, "exactly one of"),
        (json.dumps({"texts": []}).encode(), 422, "empty"),
        (json.dumps({"texts": "abc"}).encode(), 422, "bad request"),
        (json.dumps({"txt": "a"}).encode(), 422, "bad request"),
        (json.dumps({"text": {"other": "a"}}).encode(), 422, "lacks column"),
        (json.dumps({"texts": ["a"] * (MAX_TEXTS + 1)}).encode(), 413, "at most"),
        (json.dumps({"text": "a", "adapter": "tickets"}).encode(), 422,
         "m has no adapter 'tickets'; it holds one merged model, no adapter files"),
    ]:
        resp = client.post("/classify", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == code, (body[:40], resp.text)
        assert words in resp.json()["detail"]


TICKETS = ["Billing", "Shipping", "Login", "Bug"]


def test_serve_answers_each_request_with_the_adapter_it_names():
    from fastapi.testclient import TestClient

    from slmflow.serve import create_app

    clf = _fake_classifier(adapters={"tones": LABELS, "tickets": TICKETS})
    client = TestClient(create_app(clf))
    assert client.get("/health").json() == {
        "status": "ok", "labels": LABELS, "model": "m",
        "adapters": {"tones": LABELS, "tickets": TICKETS}, "default_adapter": "tones"}
    one = client.post("/classify", json={"text": "hi", "adapter": "tickets"})
    assert one.status_code == 200, one.text
    assert one.json()["label"] == "Billing" and list(one.json()["probabilities"]) == TICKETS
    assert one.json()["adapter"] == "tickets" and clf.calls[-1] == (1, None, "tickets")
    many = client.post("/classify", json={"texts": ["a", "b"]})  # none named: the default,
    assert many.json()["adapter"] == "tones" and clf.calls[-1] == (2, None, "tones")  # by name
    assert [p["label"] for p in many.json()["predictions"]] == ["Sad", "Sad"]
    bad = client.post("/classify", json={"text": "hi", "adapter": "tikets"})
    assert bad.status_code == 422
    assert bad.json()["detail"] == "m has no adapter 'tikets'; it has tones, tickets"
    assert len(clf.calls) == 2  # refused before any generation


def test_an_unknown_adapter_is_refused_naming_the_folders():
    from slmflow.classifier import UnknownAdapterError

    clf = _fake_classifier(adapters={"tones": LABELS, "tickets": TICKETS})
    assert clf.task("tickets").labels == TICKETS and clf.task().labels == LABELS
    with pytest.raises(UnknownAdapterError, match=r"^m has no adapter 'x'; it has tones, tickets$"):
        clf.task("x")
    with pytest.raises(UnknownAdapterError, match=r"^m has no adapter 'x'; it holds one merged "
                       r"model, no adapter files$"):
        _fake_classifier().task("x")


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from slmflow.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_predict_refuses_a_bad_folder_on_one_line(tmp_path, capsys):
    code, err = _cli(capsys, "predict", "--model", str(tmp_path / "none"), "hello")
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    folder = _folder(tmp_path)  # an export from before slmflow_model.json
    code, err = _cli(capsys, "predict", "--model", str(folder), "hello")
    assert code == 2 and err.count("\n") == 1 and "older slmflow" in err


@pytest.mark.parametrize(("name", "content", "message"), [
    ("rows.jsonl", '{"phrase": "a"}\n{"text": "b"}\n', "row 2 lacks column(s) ['phrase']"),
    ("rows.jsonl", '{"phrase": "a"}\nnot json\n', "rows.jsonl:2: not valid JSON"),
    ("rows.csv", "text\nhello\n", "row 1 lacks column(s) ['phrase']"),
    ("rows.txt", "hello\n", "unsupported input format"),
    ("rows.jsonl", "", "has no rows"),
    (None, None, "input file does not exist"),
])
def test_predict_input_errors_name_the_file_row_and_column(tmp_path, name, content, message):
    from slmflow.errors import DataError
    from slmflow.predict import read_texts

    path = tmp_path / (name or "missing.jsonl")
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        read_texts(path, ["phrase"])


def test_read_texts_reads_jsonl_and_csv_rows(tmp_path):
    from slmflow.predict import read_texts

    (tmp_path / "a.jsonl").write_text('{"phrase": "x", "id": 1}\n\n{"phrase": "y"}\n')
    (tmp_path / "a.csv").write_text('phrase,id\n"x, y",1\n')
    assert [r["phrase"] for r in read_texts(tmp_path / "a.jsonl", ["phrase"])] == ["x", "y"]
    assert read_texts(tmp_path / "a.csv", ["phrase"]) == [{"phrase": "x, y", "id": "1"}]


def test_import_slmflow_stays_light():
    import subprocess
    import sys

    code = ("import sys, slmflow; from slmflow import Classifier; heavy = [m for m in ('torch', "
            "'onnxruntime_genai', 'fastapi', 'transformers') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
