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
    a_train, a_eval = split_examples(rows, cfg)
    b_train, b_eval = split_examples(list(reversed(rows)), cfg)
    assert [r["_line"] for r in a_eval] == [r["_line"] for r in b_eval]
    assert {r["_line"] for r in a_train} == {r["_line"] for r in b_train}
    assert not {r["_line"] for r in a_train} & {r["_line"] for r in a_eval}
    assert len(a_eval) == round(0.3 * len(rows))
    per_label = {lab: sum(r["tone"] == lab for r in a_eval) for lab in cfg.labels}
    assert set(per_label.values()) == {len(a_eval) // 4}


def test_other_seed_gives_other_split():
    rows = load_examples("pkg:slmflow/data/tones.jsonl", DataConfig())
    _, a = split_examples(rows, DataConfig(seed=1))
    _, b = split_examples(rows, DataConfig(seed=2))
    assert [r["_line"] for r in a] != [r["_line"] for r in b]


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
