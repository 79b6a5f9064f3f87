"""Reading data files: every supported kind, and a located DataError for every kind of bad file."""

from __future__ import annotations

import gzip
import json

import pytest

from alignkit.data.io import read_located, read_records
from alignkit.errors import DataError


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_with_limit_and_locations(tmp_path):
    src = write(tmp_path / "d.jsonl", '{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
    located = read_located(src, limit=2)
    assert located.records == [{"a": 1}, {"a": 2}]
    assert located.locations == [f"{src}:1", f"{src}:3"]  # blank lines keep real line numbers


def test_real_gsm8k_and_roleplay_slices(data_dir):
    rows = read_records(str(data_dir / "gsm8k" / "train.jsonl"), limit=5)
    assert len(rows) == 5 and set(rows[0]) == {"question", "answer"}
    rows = read_records(str(data_dir / "gpteacher-roleplay" / "roleplay.json"), limit=3)
    assert len(rows) == 3 and set(rows[0]) == {"instruction", "input", "output"}


@pytest.mark.parametrize(
    "payload",
    [
        [{"a": 1}, {"a": 2}],
        {"data": [{"a": 1}, {"a": 2}]},
        {"version": "1", "rows": [{"a": 1}, {"a": 2}]},
    ],
)
def test_json_list_or_single_key_holding_a_list(tmp_path, payload):
    src = write(tmp_path / "d.json", json.dumps(payload))
    assert read_records(src) == [{"a": 1}, {"a": 2}]


def test_json_file_holding_one_conversation_is_one_row(tmp_path):
    conv = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert read_records(write(tmp_path / "c.json", json.dumps(conv))) == [conv]


def test_json_that_is_really_jsonl(tmp_path):
    src = write(tmp_path / "d.json", '{"a": 1}\n{"a": 2}\n')
    assert read_records(src) == [{"a": 1}, {"a": 2}]


def test_parquet_csv_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]), tmp_path / "d.parquet"
    )
    assert read_records(str(tmp_path / "d.parquet"), limit=1) == [{"a": 1, "b": "x"}]
    src = write(tmp_path / "d.csv", 'prompt,completion\n"hi, there",yo\nq,a\n')
    assert read_records(src) == [
        {"prompt": "hi, there", "completion": "yo"},
        {"prompt": "q", "completion": "a"},
    ]
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n'))
    assert read_records(str(tmp_path / "d.jsonl.gz")) == [{"a": 1}]


def error_of(src: str) -> DataError:
    with pytest.raises(DataError) as info:
        read_records(src)
    return info.value


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    src = write(tmp_path / "bad.jsonl", '{"a": 1}\n{"a": 2}\n{"a" 3}\n')
    err = error_of(src)
    assert err.where == f"{src}:3"
    assert "not valid JSON (Expecting ':' delimiter" in str(err)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    src = write(tmp_path / "bad.jsonl", '{"a": 1}\n[1, 2]\n')
    err = error_of(src)
    assert err.where == f"{src}:2" and "expected a JSON object, got list" in err.message


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_file(tmp_path, text):
    err = error_of(write(tmp_path / "e.jsonl", text))
    assert "empty" in err.message


def test_binary_and_non_utf8_files(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert "binary" in error_of(str(tmp_path / "b.jsonl")).message
    (tmp_path / "l.jsonl").write_bytes('{"a": "ok"}\n{"a": "caf\xe9"}\n'.encode("latin-1"))
    err = error_of(str(tmp_path / "l.jsonl"))
    assert "not UTF-8" in err.message and err.where.endswith("l.jsonl:2")


@pytest.mark.parametrize("text", ['[{"a": 1}, {"a": "ab', '[{"a": 1}, {"a":', '[{"a": 1}'])
def test_json_cut_short(tmp_path, text):
    err = error_of(write(tmp_path / "cut.json", text))
    assert "cut short" in err.message and "truncated" in err.hint


def test_invalid_json_in_the_middle_names_the_line(tmp_path):
    err = error_of(write(tmp_path / "x.json", '[\n{"a": 1},\n{"a": 1,,}\n]'))
    assert err.where.endswith("x.json:3") and "not valid JSON" in err.message


def test_json_items_must_be_objects(tmp_path):
    err = error_of(write(tmp_path / "x.json", '[{"a": 1}, 2]'))
    assert "item 1" in err.message


def test_missing_path_unknown_extension_and_directory(tmp_path):
    err = error_of(str(tmp_path / "nope.jsonl"))
    assert "does not exist" in err.message and "check the path" in err.hint
    err = error_of(write(tmp_path / "d.txt", "hello"))
    assert "unknown data file extension '.txt'" in err.message and ".jsonl" in err.hint
    assert "directory" in error_of(str(tmp_path)).message


def test_csv_row_with_too_many_fields(tmp_path):
    err = error_of(write(tmp_path / "d.csv", "a,b\n1,2\n1,2,3\n"))
    assert err.where.endswith("d.csv:3") and "header has 2" in err.message


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    import datasets

    seen = {}

    def offline(name, config, split):
        seen["args"] = (name, config, split)
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    err = error_of("someorg/somedata")
    assert seen["args"] == ("someorg/somedata", None, "train")
    assert "could not load hub dataset 'someorg/somedata'" in err.message
    assert "network" in err.hint


def test_hub_name_with_a_config(monkeypatch):
    import datasets

    from alignkit.data.io import read_located

    seen = {}

    def fake(name, config, split):
        seen["args"] = (name, config, split)
        return [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    located = read_located("openai/gsm8k:main", split="test", limit=2)
    assert seen["args"] == ("openai/gsm8k", "main", "test[:2]")
    assert located.records[1] == {"question": "q2", "answer": "a2"}
    assert located.locations[1] == "openai/gsm8k:main[test]:row 2"


def test_missing_local_file_with_slash_is_not_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "does not exist" in error_of("data/train.jsonl").message
