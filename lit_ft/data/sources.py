"""Load raw records (plain dicts) from local files or the Hugging Face hub.

Every record keeps a :class:`Location` (file and 1-based line, or row index) so that later stages can
report a bad record as ``data.jsonl:17: field 'output': empty response`` instead of a stack trace.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_ft.errors import UserError

# File suffixes we read ourselves; anything else that exists must be a datasets-loadable directory.
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
# Suffixes that make a string "look like a file" even when it does not exist (so a typo in a local path
# gives "file not found" instead of a confusing hub lookup).
_PATHLIKE_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES + (".gz", ".csv", ".tsv", ".txt", ".arrow")
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class Location:
    """Where a record came from: a file and a 1-based line, or a 0-based row of a table/hub split."""

    source: str
    line: int | None = None  # 1-based line in a text file (JSON lines, or where a list item starts)
    row: int | None = None  # 0-based row index when the source has no lines (parquet, hub)

    def __str__(self) -> str:
        if self.line is not None and self.row is not None:  # a JSON list: many records may share a line
            return f"{self.source}:{self.line} (record {self.row + 1})"
        if self.line is not None:
            return f"{self.source}:{self.line}"
        if self.row is not None:
            return f"{self.source}:row {self.row}"
        return self.source


def format_error(problem: str, location: Location | str | None = None, field: str | None = None) -> str:
    """Build ``"{path}:{line}: field '{field}': {problem}"``, leaving out the parts that are not known."""
    parts = [str(location)] if location is not None and str(location) else []
    if field is not None:
        parts.append(f"field '{field}'")
    parts.append(problem)
    return ": ".join(parts)


class DataError(UserError):
    """A one-line, user-facing problem with the input data (bad file, bad record, bad option)."""

    def __init__(self, problem: str, location: Location | str | None = None, field: str | None = None):
        self.problem = problem
        self.location = location
        self.field = field
        super().__init__(format_error(problem, location, field))


def looks_like_path(source: str) -> bool:
    """True when ``source`` is meant as a local path rather than a hub id such as ``owner/name``."""
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return source.lower().endswith(_PATHLIKE_SUFFIXES)


def load_records(source: str, split: str = "train", subset: str | None = None) -> list[dict]:
    """Load records as plain dicts from a local file/directory or a hub dataset id.

    ``split`` and ``subset`` only apply to hub ids and datasets-loadable directories; a single file is
    one split.
    """
    return load_records_with_locations(source, split, subset)[0]


def load_records_with_locations(
    source: str, split: str = "train", subset: str | None = None
) -> tuple[list[dict], list[Location]]:
    """Like :func:`load_records`, plus a parallel list with each record's :class:`Location`."""
    path = Path(source).expanduser()
    if path.is_file():
        name = path.name.lower()
        if name.endswith(JSON_SUFFIXES):
            return _read_json_file(path, source)
        if name.endswith(PARQUET_SUFFIXES):
            return _read_parquet(path, source)
        raise DataError(
            f"unsupported file type (expected one of {', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)})", source
        )
    if path.is_dir():
        return _load_with_datasets(str(path), source, split, subset)
    if looks_like_path(source):
        raise DataError("file not found", source)
    return _load_with_datasets(source, source, split, subset)


@dataclass
class SourceSplits:
    """One source's records, split: training, validation, and what the held-out evaluation renders."""

    train: list[dict]
    train_at: list[Location]
    val: list[dict]
    val_at: list[Location]
    heldout: list[dict]
    heldout_at: list[Location]
    checkable: bool = False


def read_splits(source: Any, shape: str, split: str, subset: str | None,
                max_examples: int | None, val_fraction: float, seed: int) -> SourceSplits:
    """A record source's own splits (``source.splits(shape)``, :class:`lit_ft.data.records.RecordSource`), or a
    file's / hub split's records with a seeded ``val_fraction`` held out (at least one record on each side when both
    can have one)."""
    if not isinstance(source, str):
        splits = source.splits(shape)
        train = splits.train[:max_examples] if max_examples is not None else splits.train
        heldout = splits.val if splits.heldout is None else splits.heldout
        return SourceSplits(train, [Location("<embedded train>", row=i) for i in range(len(train))],
                            splits.val, [Location("<embedded val>", row=i) for i in range(len(splits.val))],
                            heldout, [Location("<embedded held-out>", row=i) for i in range(len(heldout))],
                            splits.checkable)
    records, locations = load_records_with_locations(source, split, subset)
    if max_examples is not None:
        records, locations = records[:max_examples], locations[:max_examples]
    if not records:
        raise DataError("no records", source)
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) > 1:
        n_val = min(max(n_val, 1), len(records) - 1)  # at least one on each side
    held_out = set(random.Random(seed).sample(range(len(records)), n_val))
    train = [i for i in range(len(records)) if i not in held_out]
    val = sorted(held_out)
    val_records, val_at = [records[i] for i in val], [locations[i] for i in val]
    return SourceSplits([records[i] for i in train], [locations[i] for i in train], val_records, val_at,
                        val_records, val_at)


def _read_text(path: Path, source: str) -> str:
    """Read a (possibly gzipped) UTF-8 text file, turning decoding failures into DataError."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"cannot read file ({type(e).__name__}: {e})", source) from e


def _read_json_file(path: Path, source: str) -> tuple[list[dict], list[Location]]:
    """Read a JSON list of objects, or JSON lines (also accepted under a ``.json`` name)."""
    text = _read_text(path, source)
    start = _WHITESPACE.match(text, 0).end()
    is_jsonl_name = path.name.lower().endswith((".jsonl", ".jsonl.gz"))
    if start == len(text):
        return [], []
    if text[start] == "[" and not is_jsonl_name:
        return _parse_json_array(text, start, source)
    if text[start] == "{" and not is_jsonl_name:
        # A ``.json`` file that starts with an object is either JSON lines or one (wrong) top-level object.
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):
                raise DataError(f"invalid JSON ({e.msg}, column {e.colno})", Location(source, e.lineno)) from e
        else:
            raise DataError("top-level JSON is an object; expected a list of objects or JSON lines", source)
    elif not is_jsonl_name:
        raise DataError("top-level JSON must be a list of objects", source)
    return _parse_json_lines(text, source)


def parse_json_line(line: str, location: Location) -> dict:
    """One record of a JSON-lines file (read whole here, or streamed by :mod:`lit_ft.data.streaming`); a line that
    is not JSON, or not an object, is a DataError at ``location``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg}, column {e.colno})", location) from e
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", location)
    return record


def _parse_json_lines(text: str, source: str) -> tuple[list[dict], list[Location]]:
    """Parse one JSON object per line; blank lines are skipped."""
    records: list[dict] = []
    locations: list[Location] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        location = Location(source, number)
        records.append(parse_json_line(line, location))
        locations.append(location)
    return records, locations


def _parse_json_array(text: str, start: int, source: str) -> tuple[list[dict], list[Location]]:
    """Parse a top-level JSON array item by item, remembering the line where each object starts."""
    decoder = json.JSONDecoder()
    records: list[dict] = []
    locations: list[Location] = []
    line, counted_to = 1, 0  # newlines are counted incrementally so the walk stays linear

    def line_at(pos: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    pos = _WHITESPACE.match(text, start + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            location = Location(source, line_at(pos), row=len(records))
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg}, column {e.colno})", Location(source, e.lineno)) from e
            if not isinstance(obj, dict):
                raise DataError(f"list item is {type(obj).__name__}, expected a JSON object", location)
            records.append(obj)
            locations.append(location)
            pos = _WHITESPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WHITESPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise DataError("invalid JSON (expected ',' or ']' after a list item)", Location(source, line_at(pos)))
    if _WHITESPACE.match(text, pos).end() != len(text):
        raise DataError("invalid JSON (extra data after the top-level list)", Location(source, line_at(pos)))
    return records, locations


def _read_parquet(path: Path, source: str) -> tuple[list[dict], list[Location]]:
    """Read every row of a parquet file as a dict."""
    import pyarrow.parquet as pq  # deferred: pyarrow is heavy and only parquet sources need it

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"cannot read parquet ({type(e).__name__}: {_first_line(e)})", source) from e
    return rows, [Location(source, row=i) for i in range(len(rows))]


def _load_with_datasets(
    target: str, source: str, split: str, subset: str | None
) -> tuple[list[dict], list[Location]]:
    """Load a hub dataset id (or a datasets-loadable local directory) with ``datasets.load_dataset``."""
    import datasets  # deferred: importing datasets costs about a second

    try:
        dataset = datasets.load_dataset(target, subset, split=split)
    except Exception as e:  # network, missing split, missing dataset: all become one readable line
        raise DataError(f"cannot load dataset split '{split}' ({type(e).__name__}: {_first_line(e)})", source) from e
    rows: list[dict[str, Any]] = dataset.to_list()
    label = f"{source}[{split}]"
    return rows, [Location(label, row=i) for i in range(len(rows))]


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception message (library errors can span pages)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__

