"""Loading records from local files (and the hub code path, mocked)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lit_ft.data.sources import (
    DataError,
    Location,
    format_error,
    load_records,
    load_records_with_locations,
    looks_like_path,
    parse_json_line,
)
from lit_ft.data.streaming import stream_records

RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_json_list_round_trip_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    records, locations = load_records_with_locations(str(path))
    assert records == RECORDS
    lines = path.read_text().splitlines()
    for location in locations:  # each location points at the line where the object opens
        assert location.source == str(path)
        assert lines[location.line - 1].strip() == "{"
    assert [loc.line for loc in locations] == [2, 7, 12]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"{json.dumps(RECORDS[0])}\n\n{json.dumps(RECORDS[1])}\n", encoding="utf-8")
    records, locations = load_records_with_locations(str(path))
    assert records == RECORDS[:2]
    assert [str(loc) for loc in locations] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.json.gz"])
def test_gzipped_json_lines(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in RECORDS)
    assert load_records(str(path)) == RECORDS


def test_gzipped_json_list(tmp_path: Path) -> None:
    path = tmp_path / "data.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(RECORDS, f)
    assert load_records(str(path)) == RECORDS


def test_json_name_falls_back_to_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.json", RECORDS)
    records, locations = load_records_with_locations(str(path))
    assert records == RECORDS
    assert [loc.line for loc in locations] == [1, 2, 3]


def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    records, locations = load_records_with_locations(str(path))
    assert records == RECORDS
    assert str(locations[2]) == f"{path}:row 2"


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{json.dumps(RECORDS[0])}\n{json.dumps(RECORDS[1])}\n{{not json}}\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert str(info.value).startswith(f"{path}:3: invalid JSON")
    assert "\n" not in str(info.value)


def test_malformed_json_list_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": oops}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        load_records(str(path))


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object, got list"):
        load_records(str(path))


def test_parse_json_line_by_hand() -> None:
    at = Location("d.jsonl", 4)
    assert parse_json_line(' {"a": [1, 2]} \n', at) == {"a": [1, 2]}
    with pytest.raises(DataError, match=r"^d\.jsonl:4: invalid JSON \(Expecting value, column 7\)$"):
        parse_json_line('{"a": }', at)
    with pytest.raises(DataError, match=r"^d\.jsonl:4: expected a JSON object, got str$"):
        parse_json_line('"text"', at)


@pytest.mark.parametrize("bad_line", ["{not json}", "[1, 2]", "7"])
def test_a_bad_line_is_the_same_error_loaded_or_streamed(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(f"{json.dumps(RECORDS[0])}\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(DataError) as loaded:
        load_records(str(path))
    with pytest.raises(DataError) as streamed:
        list(stream_records(str(path)))
    assert str(loaded.value) == str(streamed.value) and str(loaded.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"data": [{"text": "a"}],\n "version": 1}', "top-level JSON is an object"),
        ('"just a string"', "top-level JSON must be a list of objects"),
        ('[{"text": "a"}, 3]', r":1 \(record 2\): list item is int, expected a JSON object"),
        ('[{"text": "a"}] []', "extra data after the top-level list"),
    ],
)
def test_top_level_json_must_be_a_list_of_objects(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_records(str(path))


def test_empty_json_list(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("[ ]\n", encoding="utf-8")
    assert load_records(str(path)) == []


@pytest.mark.parametrize("source", ["./missing.jsonl", "data/train.json", "/no/such/dir", "typo.parquet"])
def test_missing_local_file(source: str) -> None:
    with pytest.raises(DataError) as info:
        load_records(source)
    assert str(info.value) == f"{source}: file not found"


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(str(path))


def test_looks_like_path_separates_hub_ids() -> None:
    assert not looks_like_path("tatsu-lab/alpaca")
    assert not looks_like_path("imdb")
    for source in ("./alpaca", "/abs/file", "~/data", "a/b/c", "alpaca.jsonl", "x.json.gz", "dir\\file"):
        assert looks_like_path(source), source


def test_hub_id_goes_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records, locations = load_records_with_locations("tatsu-lab/alpaca", split="train", subset="default")
    assert calls == [("tatsu-lab/alpaca", "default", "train")]
    assert records == RECORDS
    assert str(locations[1]) == "tatsu-lab/alpaca[train]:row 1"


def test_hub_failure_is_one_line_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def failing_load_dataset(path, name=None, split=None):
        raise FileNotFoundError(f"Couldn't find '{path}' on the Hub.\nMore details follow\nand more")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError) as info:
        load_records("nobody/nothing", split="test")
    message = str(info.value)
    assert message.startswith("nobody/nothing: cannot load dataset split 'test' (FileNotFoundError: Couldn't find")
    assert "\n" not in message


def test_error_message_format() -> None:
    assert format_error("empty response", Location("a.jsonl", 4), "output") == "a.jsonl:4: field 'output': empty response"
    assert format_error("missing", None, "text") == "field 'text': missing"
    assert format_error("no records", "x.json") == "x.json: no records"
    error = DataError("missing", Location("d.parquet", row=3), "messages")
    assert isinstance(error, ValueError)
    assert str(error) == "d.parquet:row 3: field 'messages': missing"
    assert (error.problem, error.field) == ("missing", "messages")
