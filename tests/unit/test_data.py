"""Reading and checking data files; the deterministic, stratified split."""

from __future__ import annotations

import pytest

from slmflow.config import DataConfig
from slmflow.dataio import load_examples
from slmflow.errors import DataError
from slmflow.stages.prepare_data import split_examples


def test_bundled_data_is_balanced():
    rows = load_examples("pkg:slmflow/data/tones.jsonl", DataConfig())
    assert len(rows) >= 400
    counts = {label: sum(r["tone"] == label for r in rows) for label in DataConfig().labels}
    assert len(set(counts.values())) == 1, counts


def test_split_is_deterministic_and_stratified():
    cfg = DataConfig()
    rows = load_examples("pkg:slmflow/data/tones.jsonl", cfg)
    a_train, a_eval, a_val = split_examples(rows, cfg)
    b_train, b_eval, _ = split_examples(list(reversed(rows)), cfg)
    assert a_val == []
    assert [r["_line"] for r in a_eval] == [r["_line"] for r in b_eval]
    assert {r["_line"] for r in a_train} == {r["_line"] for r in b_train}
    assert not {r["_line"] for r in a_train} & {r["_line"] for r in a_eval}
    assert len(a_eval) == round(0.3 * len(rows))
    per_label = {lab: sum(r["tone"] == lab for r in a_eval) for lab in cfg.labels}
    assert set(per_label.values()) == {len(a_eval) // 4}


def test_other_seed_gives_other_split():
    rows = load_examples("pkg:slmflow/data/tones.jsonl", DataConfig())
    _, a, _ = split_examples(rows, DataConfig(seed=1))
    _, b, _ = split_examples(rows, DataConfig(seed=2))
    assert [r["_line"] for r in a] != [r["_line"] for r in b]


def test_a_validation_split_comes_out_of_the_training_rows_only():
    rows = load_examples("pkg:slmflow/data/tones.jsonl", DataConfig())
    train0, eval0, _ = split_examples(rows, DataConfig())
    train, held, val = split_examples(rows, DataConfig(validation_split=0.15))
    lines = [{r["_line"] for r in part} for part in (train, held, val)]
    assert lines[1] == {r["_line"] for r in eval0}  # the eval split does not move
    assert not lines[0] & lines[2] and lines[0] | lines[2] == {r["_line"] for r in train0}
    assert len(val) == round(0.15 * len(rows))
    per_label = {lab: sum(r["tone"] == lab for r in val) for lab in DataConfig().labels}
    assert set(per_label.values()) == {len(val) // 4}
    # with an eval file, validation is still carved from the training file
    train_f, held_f, val_f = split_examples(rows, DataConfig(validation_split=0.1), held_out=False)
    assert held_f == [] and len(val_f) == round(0.1 * len(rows)) and len(train_f) + len(val_f) == len(rows)


def test_splits_that_leave_nothing_to_train_on_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"data\.eval_split \(0\.5\) \+ data\.validation_split \(0\.4\).*below 0\.9"):
        DataConfig(eval_split=0.5, validation_split=0.4)


@pytest.mark.parametrize(
    "rows, match",
    [
        (['{"phrase": "a", "tone": "Sad"}', '{"phrase": "b", "tone": '], r"data\.jsonl:2:\d+: broken JSON line"),
        ([{"phrase": "a", "tone": "Sad"}, {"text": "b", "tone": "Joy"}], r"data\.jsonl:2: missing column 'phrase' \(columns there: text, tone\)"),
        ([{"phrase": "a", "tone": "Sad"}, {"phrase": "b", "tone": "Angry"}], r"data\.jsonl:2: label 'Angry' in column 'tone' is not in data\.labels"),
        ([{"phrase": "", "tone": "Sad"}], r"data\.jsonl:1: column 'phrase' is empty"),
        (["[1, 2]"], r"data\.jsonl:1: each line must be a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(write_jsonl, rows, match):
    with pytest.raises(DataError, match=match):
        load_examples(str(write_jsonl(rows)), DataConfig())


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        load_examples(str(tmp_path / "none.jsonl"), DataConfig())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the data file is empty"):
        load_examples(str(empty), DataConfig())
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"phrase": "ok", "tone": "Sad"}\n{"phrase": "caf\xe9", "tone": "Joy"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8"):
        load_examples(str(latin), DataConfig())


def test_csv_and_json_array(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("phrase,tone\nhello there,Joy\nuh oh,Fear\n")
    assert [r["tone"] for r in load_examples(str(csv_file), DataConfig())] == ["Joy", "Fear"]
    arr = tmp_path / "d.json"
    arr.write_text('[{"phrase": "x", "tone": "Sad"}]')
    assert load_examples(str(arr), DataConfig())[0]["phrase"] == "x"
    bad = tmp_path / "d.csv2"
    bad.write_text("x")
    with pytest.raises(DataError, match=r"unsupported data format '\.csv2'"):
        load_examples(str(bad), DataConfig())


def test_all_four_labels_read(write_jsonl):
    rows = [{"phrase": f"row {i}", "tone": t} for i, t in enumerate(["Sad", "Joy", "Fear", "Surprise"] * 2)]
    assert [r["tone"] for r in load_examples(str(write_jsonl(rows)), DataConfig())][:4] == ["Sad", "Joy", "Fear", "Surprise"]
