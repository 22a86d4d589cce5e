"""InstructionDataModule / PretrainDataModule end to end on small local files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_ft.data.datamodule import InstructionDataModule, PretrainDataModule, SeededShuffleSampler
from lit_ft.data.formats import IGNORE_INDEX
from lit_ft.data.sources import DataError


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Repeat the number {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i} " * (i % 7 + 1)}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_setup_packed_dataloader(tokenizer, tmp_path: Path, capsys, caplog) -> None:
    source = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(40))
    dm = InstructionDataModule(source=source, tokenizer=tokenizer, max_seq_length=128, micro_batch_size=4,
                               val_split_fraction=0.1)
    with caplog.at_level(logging.INFO, logger="lit_ft"):
        dm.setup("fit")
    assert dm.train_format == "alpaca"
    assert (dm.stats_train.examples, dm.stats_val.examples) == (36, 4)
    assert len(dm.eval_records) == 4 and all("instruction" in r for r in dm.eval_records)
    assert dm.stats_train.packing_efficiency > 0.5 and dm.stats_train.rows < 36
    printed = capsys.readouterr().out
    assert "train: 36 examples" in printed and "val: 4 examples" in printed
    assert any("train: 36 examples" in r.getMessage() for r in caplog.records)

    batches = list(dm.train_dataloader())
    assert len(batches) == -(-dm.stats_train.rows // 4)
    supervised = 0
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        shape = batch["input_ids"].shape
        assert shape[0] <= 4 and shape[1] % 8 == 0 and shape[1] <= 128
        assert batch["labels"].shape == shape == batch["position_ids"].shape
        assert batch["input_ids"].dtype == torch.long
        assert batch["labels"][batch["position_ids"] == 0].eq(IGNORE_INDEX).all()
        supervised += int((batch["labels"] != IGNORE_INDEX).sum())
    assert supervised == dm.stats_train.supervised_tokens
    val = next(iter(dm.val_dataloader()))
    assert set(val) == {"input_ids", "labels", "position_ids"}


def test_padded_dataloader_and_stats(tokenizer, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(12))
    dm = InstructionDataModule(source=source, tokenizer=tokenizer, packing=False, micro_batch_size=3,
                               val_split_fraction=0.0)
    dm.setup()
    assert dm.stats_val.examples == 0 and dm.eval_records == []
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
        assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] % 8 == 0
        assert batch["labels"][batch["attention_mask"] == 0].eq(IGNORE_INDEX).all()
    assert sum(int(b["attention_mask"].sum()) for b in batches) == dm.stats_train.tokens
    assert list(dm.val_dataloader()) == []


def test_shuffle_is_seeded_per_epoch() -> None:
    sampler = SeededShuffleSampler(50, seed=7)
    first = list(sampler)
    assert first == list(SeededShuffleSampler(50, seed=7)) and sorted(first) == list(range(50))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    resumed = SeededShuffleSampler(50, seed=7)
    resumed.set_epoch(1)
    assert list(resumed) == second


def test_zero_usable_examples_raises(tokenizer, tmp_path: Path) -> None:
    rows = [{"text": "word " * 200} for _ in range(5)]
    source = write_jsonl(tmp_path / "long.jsonl", rows)
    dm = InstructionDataModule(source=source, tokenizer=tokenizer, max_seq_length=32, overlong="drop",
                               val_split_fraction=0.0)
    with pytest.raises(DataError, match=r"long\.jsonl: no usable training examples \(5 of 5 dropped"):
        dm.setup()
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        InstructionDataModule(source=empty, tokenizer=tokenizer).setup()


def test_bad_record_error_names_line(tokenizer, tmp_path: Path) -> None:
    rows = alpaca_rows(5)
    rows[3] = {"instruction": "x", "output": ""}
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    dm = InstructionDataModule(source=source, tokenizer=tokenizer, val_split_fraction=0.0,
                               skip_empty_responses=False)
    with pytest.raises(DataError, match=r"bad\.jsonl:4: field 'output': empty response"):
        dm.setup()


def test_empty_responses_are_skipped_and_counted_by_default(tokenizer, tmp_path: Path, capsys) -> None:
    rows = alpaca_rows(6)
    rows[2]["output"] = ""
    rows[4]["output"] = "  "
    source = tmp_path / "list.json"
    source.write_text(json.dumps(rows))  # one line: the record number tells them apart
    dm = InstructionDataModule(source=str(source), tokenizer=tokenizer, val_split_fraction=0.0)
    dm.setup()
    assert dm.stats_train.examples == 4 and dm.stats_train.empty == 2
    out = capsys.readouterr().out
    assert "skipped 2 records with an empty response" in out and "list.json:1 (record 3)" in out


def test_no_source_and_bad_options(tokenizer) -> None:
    with pytest.raises(DataError, match="no data source given"):
        InstructionDataModule(tokenizer=tokenizer).setup()
    with pytest.raises(DataError, match="unknown format"):
        InstructionDataModule(source="x.jsonl", format="sharegpt")
    with pytest.raises(DataError, match="overlong"):
        InstructionDataModule(source="x.jsonl", overlong="wrap")


def test_embedded_records_hook_and_trainer_tokenizer(tokenizer) -> None:
    class Embedded(InstructionDataModule):
        def embedded_records(self):
            train = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(20)]
            return train, [{"prompt": "1+1=", "completion": "2"}]

    dm = Embedded(max_examples=10)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tokenizer))
    dm.setup("fit")
    assert dm.train_format == "prompt_completion"
    assert (dm.stats_train.examples, dm.stats_val.examples) == (10, 1)
    assert dm.eval_records == [{"prompt": "1+1=", "completion": "2"}]


def test_separate_val_source_and_chat(tokenizer, tmp_path: Path) -> None:
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(6)]
    train = write_jsonl(tmp_path / "train.jsonl", chats)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "held out document"}])
    dm = InstructionDataModule(source=train, val_source=val, tokenizer=tokenizer)
    dm.setup()
    assert (dm.train_format, dm.val_format) == ("chat", "text")
    assert (dm.stats_train.examples, dm.stats_val.examples) == (6, 1)


def test_pretrain_module_supervises_every_token(tokenizer, tmp_path: Path) -> None:
    docs = [{"text": f"Document number {i} has some words in it."} for i in range(10)]
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    dm = PretrainDataModule(source=source, tokenizer=tokenizer, max_seq_length=64, val_split_fraction=0.0)
    dm.setup()
    assert dm.train_format == "text" and dm.packing
    batch = next(iter(dm.train_dataloader()))
    real = batch["input_ids"] != tokenizer.pad_token_id
    starts = batch["position_ids"] == 0
    assert torch.equal(batch["labels"] != IGNORE_INDEX, real & ~starts)  # every token except each BOS
    assert dm.stats_train.supervised_tokens == dm.stats_train.tokens - dm.stats_train.examples
