"""A streamed mix: lazy readers, the position each batch carries, and an exact resume from it (in process; the
SIGKILL resume through `lit-ft` is in tests/integration/test_stream_resume.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from lit_ft.data.instruction import InstructionDataModule
from lit_ft.data.mixing import MixSource
from lit_ft.data.sources import DataError
from lit_ft.data.streaming import POSITION_KEY, StreamedMix, StreamedReader, stream_records


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Write {i} in words.", "input": "", "output": "" if i % 13 == 5 else f"number {i}"}
            for i in range(start, start + n)]


def jsonl(path: Path, records: list[dict]) -> str:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


def module(tokenizer, tmp_path: Path, **kwargs) -> InstructionDataModule:
    """A streamed file (60 records, 4 with an empty response) mixed 2:1 with a loaded one of 20 records."""
    streamed = tmp_path / "stream.jsonl"
    if not streamed.exists():
        jsonl(streamed, rows(60))
        jsonl(tmp_path / "loaded.jsonl", [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(20)])
    sources = [MixSource(str(streamed), weight=2, streaming=True, val_records=3),
               MixSource(str(tmp_path / "loaded.jsonl"), weight=1)]
    settings = {"max_seq_length": 48, "micro_batch_size": 2, "val_split_fraction": 0.1, "seed": 3} | kwargs
    dm = InstructionDataModule(sources=sources, **settings)
    dm.connect(tokenizer)
    dm.setup("fit")
    return dm


def consume(dm: InstructionDataModule, batches: int) -> list[tuple[dict, dict]]:
    """Take ``batches`` batches as the training loop does (the position taken out, then consumed)."""
    taken, iterator = [], iter(dm.train_dataloader())
    while len(taken) < batches:
        batch = next(iterator, None)
        if batch is None:  # an epoch ended; Lightning starts the next one with a new iterator
            iterator = iter(dm.train_dataloader())
            continue
        position = batch.pop(POSITION_KEY)
        dm.train_dataset.consumed = position
        taken.append((batch, position))
    return taken


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- the readers
def test_readers_stream_lines_lists_gzip_and_parquet_from_an_offset(tmp_path: Path) -> None:
    records = rows(10)
    for name in ("a.jsonl", "a.jsonl.gz", "list.json"):
        path = tmp_path / name
        if name == "list.json":
            path.write_text(json.dumps(records))
        else:
            jsonl(path, records)
        got = list(StreamedReader(str(path), "train", None, head=2, limit=8).records(0, offset=3))
        assert [r for r, _ in got] == records[5:8], name
    assert str(next(stream_records(str(tmp_path / "a.jsonl")))[1]) == f"{tmp_path / 'a.jsonl'}:1"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "t.parquet", row_group_size=3)
    got = list(StreamedReader(str(tmp_path / "t.parquet"), "train", None, 0, None).records(0, offset=4))
    assert [r for r, _ in got] == records[4:] and str(got[0][1]).endswith("t.parquet:row 4")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object"):
        list(stream_records(str(bad)))


# ----------------------------------------------------------------------------------------------- the stream
def test_a_stream_resumes_exactly_from_any_consumed_position(tokenizer, tmp_path: Path) -> None:
    dm = module(tokenizer, tmp_path)
    assert isinstance(dm.train_dataset, StreamedMix) and dm.stats_train is None
    assert dm.stats_val.examples == 3 + 2  # the stream's first 3 records, 10% of the loaded source
    reference = consume(dm, 40)
    epochs = [position["epoch"] for _, position in reference]
    assert 0 < epochs.index(1) < epochs.index(2) < 40  # the run crosses two epoch ends
    for k in (0, 4, epochs.index(1) - 1, epochs.index(1), 33):
        resumed = module(tokenizer, tmp_path)
        resumed.train_dataloader().load_state_dict({"stream": reference[k][1]})
        replay = consume(resumed, 40 - k - 1)
        assert all(same(a[0], b[0]) for a, b in zip(replay, reference[k + 1:])), k
        assert replay[-1][1] == reference[-1][1]


def test_the_stream_follows_the_weights_and_counts_what_it_drops(tokenizer, tmp_path: Path, capsys) -> None:
    dm = module(tokenizer, tmp_path)
    position = consume(dm, 60)[-1][1]
    streamed, loaded = position["stats"]
    assert streamed["dropped"] == {"empty response": position["stats"][0]["records"] - streamed["examples"]}
    assert streamed["dropped"]["empty response"] > 0
    share = streamed["records"] / (streamed["records"] + loaded["records"])
    assert abs(share - 2 / 3) < 0.05, share  # 60 batches of a few examples: a loose bound
    dm.teardown("fit")
    out = capsys.readouterr().out
    assert "[data] streamed mix, as consumed by training" in out and "stream.jsonl (streamed): weight 66.7%" in out


def test_ranks_split_the_rows_one_process_would_batch(tokenizer, tmp_path: Path) -> None:
    whole = consume(module(tokenizer, tmp_path, micro_batch_size=4), 6)
    for rank in (0, 1):
        dm = module(tokenizer, tmp_path, micro_batch_size=2)
        dm.train_dataset.replicas, dm.train_dataset.rank = 2, rank
        it = iter(dm.train_dataset)
        for batch, position in whole:
            mine = next(it)
            assert mine.pop(POSITION_KEY) == position  # every rank saves the same position
            for key in ("input_ids", "labels"):
                width = mine[key].shape[1]
                assert torch.equal(mine[key], batch[key][rank::2, :width])


def test_a_checkpoint_of_another_mix_is_refused(tokenizer, tmp_path: Path) -> None:
    loader = module(tokenizer, tmp_path).train_dataloader()
    with pytest.raises(DataError, match="map-style one"):
        loader.load_state_dict({"epoch": 0, "consumed_batches": 3})
    state = loader.state_dict()
    state["stream"]["passes"].append(0)
    with pytest.raises(DataError, match="the checkpoint's stream has 3 sources, the config's 2"):
        loader.load_state_dict(state)


def test_a_stream_with_nothing_left_to_train_on_is_one_line(tokenizer, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "s.jsonl", rows(10))
    dm = InstructionDataModule(sources=[MixSource(data, streaming=True, val_records=3, max_examples=3)])
    dm.connect(tokenizer)
    with pytest.raises(DataError, match=r"^data.sources\[0\] \(s.jsonl\): no training records after the 3 held out"):
        dm.setup("fit")


def test_a_stream_whose_records_are_all_dropped_stops_with_one_line(tokenizer, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "long.jsonl", [{"instruction": "Say it. " * 40, "input": "", "output": "ok"}] * 3)
    dm = InstructionDataModule(sources=[MixSource(data, streaming=True)], max_seq_length=16, overlong="drop")
    dm.connect(tokenizer)
    dm.setup("fit")
    with pytest.raises(DataError, match=r"no usable training examples in a whole pass .*'overlong': 6"):
        next(iter(dm.train_dataloader()))
