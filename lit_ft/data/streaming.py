"""A mix read while training: sources streamed record by record (larger than memory), tokenized on the fly, packed
greedily into rows, with an exact resume.

The whole state of the stream is a small :class:`dict` (the *position*): how many mix draws were made, each
source's pass and offset, the examples of the row being packed, and the per-source counts. Every batch carries the
position reached after it under :data:`POSITION_KEY`; the data module takes it out before the batch reaches the
model (``on_before_batch_transfer``) and keeps the position of the last batch the training loop *consumed* (not of
the ones the loader prefetched). A checkpoint stores that position and a resume starts the stream from it: each
source is reopened at its offset (a file is read past the records already used, not tokenized again), the draws
continue from their count (:class:`lit_ft.data.mixing.MixDraws`), and the half-packed row comes back as it was.

An epoch ends as the mix's ``stopping`` says (the first source finishes a pass, or every source has); the next
epoch continues from there, the finished sources starting a new pass (loaded ones in a new seeded order; streamed
ones in file order again: a stream is never shuffled, so shuffle large files once before training).
"""

from __future__ import annotations

import copy
import gzip
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from lit_ft.data.mixing import MixDraws, SourceStats, Stopping, pass_order
from lit_ft.data.sources import (
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    DataError,
    Location,
    _first_line,
    load_records_with_locations,
    looks_like_path,
    parse_json_line,
)

POSITION_KEY = "data_position"  # the batch entry that carries the stream position; removed before the model
PARQUET_BATCH_ROWS = 1024  # rows read from a parquet file at a time: small enough for any row width

Record = tuple[dict, Location]
# What a streamed mix asks of the data module for one record: its example (or None) and why it was not kept.
TokenizeOne = Callable[[dict, Location, str], tuple[dict | None, str | None, bool]]


# -------------------------------------------------------------------------------------------- record readers
def stream_records(source: str, split: str = "train", subset: str | None = None, skip: int = 0) -> Iterator[Record]:
    """Records of a file, directory or hub id from record ``skip`` on, read lazily: JSON lines (also gzipped) a
    line at a time (the skipped lines are not parsed), parquet a batch at a time, a directory or hub id through
    ``datasets.load_dataset(..., streaming=True)``. A JSON list cannot be read in parts: it is loaded whole (write
    JSON lines for data larger than memory)."""
    path = Path(source).expanduser()
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")) or (name.endswith(JSON_SUFFIXES) and _starts_with_object(path)):
            yield from _json_lines(path, source, skip)
        elif name.endswith(JSON_SUFFIXES):
            records, locations = load_records_with_locations(source, split, subset)
            yield from zip(records[skip:], locations[skip:])
        elif name.endswith(PARQUET_SUFFIXES):
            yield from itertools.islice(_parquet_rows(path, source), skip, None)
        else:
            raise DataError(f"unsupported file type (expected one of {', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)})",
                            source)
        return
    if not path.is_dir() and looks_like_path(source):
        raise DataError("file not found", source)
    yield from itertools.islice(_datasets_stream(str(path) if path.is_dir() else source, source, split, subset),
                                skip, None)


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _starts_with_object(path: Path) -> bool:
    try:
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    return line.lstrip().startswith("{")
    except (OSError, UnicodeDecodeError, EOFError):
        return True  # let the line reader report it with its location
    return True


def _json_lines(path: Path, source: str, skip: int = 0) -> Iterator[Record]:
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if skip:  # a record already used: counted, not parsed
                    skip -= 1
                    continue
                location = Location(source, number)
                yield parse_json_line(line, location), location
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"cannot read file ({type(e).__name__}: {e})", source) from e


def _parquet_rows(path: Path, source: str) -> Iterator[Record]:
    import pyarrow.parquet as pq  # deferred: only parquet sources need it

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield record, Location(source, row=row)
                row += 1
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"cannot read parquet ({type(e).__name__}: {_first_line(e)})", source) from e


def _datasets_stream(target: str, source: str, split: str, subset: str | None) -> Iterator[Record]:
    import datasets  # deferred: importing datasets costs about a second

    try:
        dataset = datasets.load_dataset(target, subset, split=split, streaming=True)
        label = f"{source}[{split}]"
        for row, record in enumerate(dataset):
            yield dict(record), Location(label, row=row)
    except Exception as e:  # network, missing split, missing dataset: all become one readable line
        raise DataError(f"cannot stream dataset split '{split}' ({type(e).__name__}: {_first_line(e)})",
                        source) from e


class StreamedReader:
    """A streamed source: records ``[head, limit)`` of the stream (``head`` held out for validation), each pass
    in file order."""

    def __init__(self, source: str, split: str, subset: str | None, head: int, limit: int | None):
        self.source, self.split, self.subset, self.head, self.limit = source, split, subset, head, limit

    def records(self, epoch: int, offset: int) -> Iterator[Record]:
        start = self.head + offset
        stop = None if self.limit is None else max(self.limit - start, 0)
        return itertools.islice(stream_records(self.source, self.split, self.subset, skip=start), stop)


class LoadedReader:
    """A loaded source in a streamed mix: its records in a new seeded order each pass."""

    def __init__(self, records: list[dict], locations: list[Location], seed: int, index: int):
        self.pairs, self.seed, self.index = list(zip(records, locations)), seed, index

    def records(self, epoch: int, offset: int) -> Iterator[Record]:
        order = pass_order(len(self.pairs), self.seed, self.index, epoch)
        return (self.pairs[i] for i in order[offset:])


class _Peekable:
    """An iterator that knows whether it has another item (so a source's last record ends its pass at once)."""

    _NOTHING = object()

    def __init__(self, iterator: Iterator[Record]):
        self.iterator, self.next_item = iterator, next(iterator, self._NOTHING)

    def has_next(self) -> bool:
        return self.next_item is not self._NOTHING

    def pop(self) -> Record:
        item, self.next_item = self.next_item, next(self.iterator, self._NOTHING)
        return item


# ----------------------------------------------------------------------------------------------- the stream
def start_position(stats: list[SourceStats]) -> dict[str, Any]:
    """The position of a stream that has not started."""
    n = len(stats)
    return {"draws": 0, "epoch": 0, "passes": [0] * n, "offsets": [0] * n, "finished": [False] * n,
            "ending": False, "row": [], "rows": 0, "stats": [s.as_dict() for s in stats]}


class StreamedMix(IterableDataset):
    """Training batches of a weighted mix, read, tokenized and packed while training (see the module docstring).

    Yields whole batches (use it with ``batch_size=None``): ``replicas x micro_batch_size`` rows are made at a
    time, rank ``r`` takes rows ``r, r + R, ...`` of them, and each batch carries the position after all of them,
    so every rank saves the same position. ``consumed`` is where the next iteration starts: the data module sets
    it from each consumed batch, and a checkpoint restores it.
    """

    def __init__(self, readers: list[Any], formats: list[str], stats: list[SourceStats], seed: int,
                 tokenize_one: TokenizeOne, collate: Callable[[list[dict]], dict], max_seq_length: int,
                 packing: bool, micro_batch_size: int, stopping: Stopping = "first_exhausted",
                 replicas: int = 1, rank: int = 0):
        self.readers, self.formats = readers, formats
        self.weights = [s.weight for s in stats]
        self.draws = MixDraws(self.weights, seed)
        self.tokenize_one, self.collate = tokenize_one, collate
        self.max_seq_length, self.packing = max_seq_length, packing
        self.micro_batch_size, self.stopping = micro_batch_size, stopping
        self.replicas, self.rank = replicas, rank
        self.consumed = start_position(stats)

    # --------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        pos = copy.deepcopy(self.consumed)
        opened: dict[int, _Peekable] = {}
        chunk: list[list[list[list[int]]]] = []
        chunk_rows = self.replicas * self.micro_batch_size
        kept_before = sum(s["examples"] for s in pos["stats"])
        idle_ends = 0  # epoch ends in a row with no example kept between them
        while True:
            if not pos["ending"]:
                row = self._advance(pos, opened)
                if row is not None:
                    chunk.append(row)
            if pos["ending"] and pos["row"] and len(chunk) < chunk_rows:
                chunk.append(pos["row"])
                pos["row"] = []
            ends = pos["ending"] and not pos["row"]
            if ends:
                pos.update(ending=False, epoch=pos["epoch"] + 1, finished=[False] * len(self.readers))
                kept = sum(s["examples"] for s in pos["stats"])
                idle_ends = idle_ends + 1 if kept == kept_before else 0
                kept_before = kept
                if idle_ends >= 2:  # a whole pass of the mix gave nothing: it never will
                    raise DataError("no usable training examples in a whole pass of the streamed mix "
                                    + ", ".join(f"{s['label']}: {s['dropped']}" for s in pos["stats"]))
            if chunk and (len(chunk) == chunk_rows or ends):
                pos["rows"] += len(chunk)
                yield self._batch(chunk, pos)
                chunk = []
                if ends:
                    return

    def _advance(self, pos: dict[str, Any], opened: dict[int, _Peekable]) -> list[list[list[int]]] | None:
        """One draw: read the chosen source's next record, tokenize it, place it in the row being packed.
        Returns the row it completed, if any (one at most: a row that is exactly full is only given back when
        the next example arrives)."""
        source = self.draws[pos["draws"]]
        pos["draws"] += 1
        if source not in opened:
            opened[source] = _Peekable(self.readers[source].records(pos["passes"][source], pos["offsets"][source]))
        reader = opened[source]
        record, location = reader.pop()
        pos["offsets"][source] += 1
        stats = pos["stats"][source]
        stats["records"] += 1
        example, reason, truncated = self.tokenize_one(record, location, self.formats[source])
        if not reader.has_next():  # the pass is over: the next draw of this source starts a new one
            del opened[source]
            pos["passes"][source] += 1
            pos["offsets"][source] = 0
            pos["finished"][source] = True
            live = [i for i, w in enumerate(self.weights) if w > 0]
            if self.stopping == "first_exhausted" or all(pos["finished"][i] for i in live):
                pos["ending"] = True
        if example is None:
            stats["dropped"][reason] = stats["dropped"].get(reason, 0) + 1
            return None
        ids, labels = list(example["input_ids"]), list(example["labels"])
        stats["examples"] += 1
        stats["mixed_examples"] += 1
        stats["tokens"] += len(ids)
        stats["mixed_tokens"] += len(ids)
        stats["truncated"] += int(truncated)
        if not self.packing:
            return [[ids, labels]]
        used = sum(len(part[0]) for part in pos["row"])
        if pos["row"] and used + len(ids) > self.max_seq_length:
            done, pos["row"] = pos["row"], [[ids, labels]]
            return done
        pos["row"].append([ids, labels])
        return None

    def _batch(self, chunk: list[list[list[list[int]]]], pos: dict[str, Any]) -> dict:
        rows = list(chunk)
        if self.replicas > 1:
            rows += (rows * self.replicas)[: -len(rows) % self.replicas]  # every rank gets as many rows
        batch = self.collate([_row_item(row) for row in rows[self.rank :: self.replicas]])
        batch[POSITION_KEY] = copy.deepcopy(pos)
        return batch

    # ---------------------------------------------------------------------------------------------- position
    def source_stats(self) -> list[SourceStats]:
        """The per-source counts of what training has consumed so far."""
        return [SourceStats.from_dict(s) for s in self.consumed["stats"]]


def _row_item(row: list[list[list[int]]]) -> dict[str, torch.Tensor]:
    """A row of examples ``[[ids, labels], ...]`` as the collators take it: position ids restart per example."""
    return {"input_ids": torch.tensor([t for ids, _ in row for t in ids], dtype=torch.long),
            "labels": torch.tensor([t for _, labels in row for t in labels], dtype=torch.long),
            "position_ids": torch.cat([torch.arange(len(ids)) for ids, _ in row])}


class StreamingDataLoader(DataLoader):
    """The loader of a :class:`StreamedMix`: its consumed position is part of the checkpoint (Lightning saves any
    loader with ``state_dict``, as it does the map-style ``ResumableDataLoader``)."""

    def state_dict(self) -> dict[str, Any]:
        return {"stream": copy.deepcopy(self.dataset.consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stream" not in state:
            raise DataError("the checkpoint's data position is a map-style one, the config's data streams: resume "
                            "with the sources the checkpoint was trained on")
        mine = self.dataset.consumed
        if len(state["stream"]["passes"]) != len(mine["passes"]):
            raise DataError(f"the checkpoint's stream has {len(state['stream']['passes'])} sources, the config's "
                            f"{len(mine['passes'])}: resume with the sources the checkpoint was trained on")
        self.dataset.consumed = copy.deepcopy(state["stream"])
