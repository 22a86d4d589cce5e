"""InstructionDataModule / PretrainDataModule end to end on small local files and the embedded world."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.formats import IGNORE_INDEX
from lit_ft.data.instruction import InstructionDataModule, PretrainDataModule
from lit_ft.data.sources import DataError


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Repeat the number {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i} " * (i % 7 + 1)}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def connected(dm, tokenizer):
    dm.connect(tokenizer)
    return dm


def test_setup_packed_dataloader(tokenizer, tmp_path: Path, capsys, caplog) -> None:
    source = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(40))
    dm = connected(InstructionDataModule(source=source, max_seq_length=128, micro_batch_size=4,
                                         val_split_fraction=0.1), tokenizer)
    with caplog.at_level(logging.INFO, logger="lit_ft"):
        dm.setup("fit")
    assert dm.train_format == "alpaca"
    assert (dm.stats_train.examples, dm.stats_val.examples) == (36, 4)
    assert len(dm.heldout()) == 4 and all("instruction" in item.record for item in dm.heldout())
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
    dm = connected(InstructionDataModule(source=source, packing=False, micro_batch_size=3, val_split_fraction=0.0),
                   tokenizer)
    dm.setup()
    assert dm.stats_val.examples == 0 and dm.heldout() == []
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
        assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] % 8 == 0
        assert batch["labels"][batch["attention_mask"] == 0].eq(IGNORE_INDEX).all()
    assert sum(int(b["attention_mask"].sum()) for b in batches) == dm.stats_train.tokens
    assert list(dm.val_dataloader()) == []


def test_zero_usable_examples_raises(tokenizer, tmp_path: Path) -> None:
    rows = [{"text": "word " * 200} for _ in range(5)]
    source = write_jsonl(tmp_path / "long.jsonl", rows)
    dm = connected(InstructionDataModule(source=source, max_seq_length=32, overlong="drop", val_split_fraction=0.0),
                   tokenizer)
    with pytest.raises(DataError, match=r"long\.jsonl: no usable training examples \(5 of 5 dropped"):
        dm.setup()
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        connected(InstructionDataModule(source=empty), tokenizer).setup()


def test_bad_record_error_names_line(tokenizer, tmp_path: Path) -> None:
    rows = alpaca_rows(5)
    rows[3] = {"instruction": "x", "output": ""}
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    dm = connected(InstructionDataModule(source=source, val_split_fraction=0.0, skip_empty_responses=False),
                   tokenizer)
    with pytest.raises(DataError, match=r"bad\.jsonl:4: field 'output': empty response"):
        dm.setup()


def test_empty_responses_are_skipped_and_counted_by_default(tokenizer, tmp_path: Path, capsys) -> None:
    rows = alpaca_rows(6)
    rows[2]["output"] = ""
    rows[4]["output"] = "  "
    source = tmp_path / "list.json"
    source.write_text(json.dumps(rows))  # one line: the record number tells them apart
    dm = connected(InstructionDataModule(source=str(source), val_split_fraction=0.0), tokenizer)
    dm.setup()
    assert dm.stats_train.examples == 4 and dm.stats_train.empty == 2
    out = capsys.readouterr().out
    assert "skipped 2 records with an empty response" in out and "list.json:1 (record 3)" in out


def test_no_source_and_bad_options(tokenizer) -> None:
    with pytest.raises(DataError, match="no data source given"):
        connected(InstructionDataModule(), tokenizer).setup()
    with pytest.raises(DataError, match="unknown format"):
        InstructionDataModule(source="x.jsonl", format="sharegpt")
    with pytest.raises(DataError, match="overlong"):
        InstructionDataModule(source="x.jsonl", overlong="wrap")


def test_separate_val_source_and_chat(tokenizer, tmp_path: Path) -> None:
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(6)]
    train = write_jsonl(tmp_path / "train.jsonl", chats)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "held out document"}])
    dm = connected(InstructionDataModule(source=train, val_source=val), tokenizer)
    dm.setup()
    assert (dm.train_format, dm.val_format) == ("chat", "text")
    assert (dm.stats_train.examples, dm.stats_val.examples) == (6, 1)


def test_pretrain_module_supervises_every_token(tokenizer, tmp_path: Path) -> None:
    docs = [{"text": f"Document number {i} has some words in it."} for i in range(10)]
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    dm = connected(PretrainDataModule(source=source, max_seq_length=64, val_split_fraction=0.0), tokenizer)
    dm.setup()
    assert dm.train_format == "text" and dm.packing
    batch = next(iter(dm.train_dataloader()))
    real = batch["input_ids"] != tokenizer.pad_token_id
    starts = batch["position_ids"] == 0
    assert torch.equal(batch["labels"] != IGNORE_INDEX, real & ~starts)  # every token except each BOS
    assert dm.stats_train.supervised_tokens == dm.stats_train.tokens - dm.stats_train.examples


@pytest.mark.parametrize("row, field", [({"instruction": "  ", "output": "x"}, "instruction"),
                                        ({"prompt": "", "completion": "x"}, "prompt"),
                                        ({"messages": [{"role": "user", "content": ""},
                                                       {"role": "assistant", "content": "x"}]}, "messages[0].content")])
def test_an_empty_prompt_is_one_line_naming_file_line_and_field(tokenizer, tmp_path: Path, row, field) -> None:
    """The one rule for empty prompts (SFT, preference and prompt data alike): an error, never skipped."""
    good = {"instruction": "Say yes.", "output": "yes"} if "instruction" in row else \
        {"prompt": "Say yes.", "completion": "yes"} if "prompt" in row else \
        {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]}
    source = write_jsonl(tmp_path / "sft.jsonl", [good, row])
    dm = connected(InstructionDataModule(source=source, val_split_fraction=0.0), tokenizer)  # skips empty responses
    with pytest.raises(DataError, match=rf"sft\.jsonl:2: field '{re.escape(field)}': empty prompt$"):
        dm.setup()


def test_embedded_tasks_are_checkable_and_held_out(tokenizer) -> None:
    dm = connected(InstructionDataModule(EmbeddedWorld(num_train=24, num_heldout=4), max_seq_length=128), tokenizer)
    dm.setup("fit")
    assert dm.train_format == "alpaca" and (dm.stats_train.examples, dm.stats_val.examples) == (24, 4)
    items = dm.heldout()
    assert dm.checkable and len(items) == 4 and all(item.reference and item.task for item in items)
    assert {item.record["instruction"] for item in items}.isdisjoint(
        r["instruction"] for r in EmbeddedWorld(num_train=24, num_heldout=4).splits("instruction").train)
