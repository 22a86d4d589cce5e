"""The held-out contract: items rendered as in training, what each data shape offers, and the evaluation that reads
it (the generation table) through the protocol alone."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lit_ft.callbacks import evaluation
from lit_ft.callbacks.evaluation import GenerationTable
from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.formats import Prompt, format_alpaca_prompt, format_prompt
from lit_ft.data.heldout import HeldOut, HeldOutItem, heldout_items
from lit_ft.data.instruction import InstructionDataModule, PretrainDataModule
from lit_ft.data.sources import Location


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_items_are_rendered_as_in_training(tokenizer) -> None:
    records = [{"instruction": "Add 2 and 3.", "output": "5", "task": "add"},
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
               {"text": "raw text has no prompt"},
               {"prompt": "Q: 1+1?", "chosen": "2", "rejected": "3"}]
    locations = [Location("f.jsonl", i + 1) for i in range(4)]
    items = heldout_items(records, locations, tokenizer, "text")
    assert [item.record for item in items] == [records[0], records[1], records[3]]  # the text record: no item
    assert items[0].prompt == format_prompt(records[0], tokenizer) and (items[0].reference, items[0].task) == ("5", "add")
    assert items[1].reference == "Hello" and items[1].task is None
    assert items[2].reference is None and tokenizer.decode(items[2].prompt.input_ids).endswith("Q: 1+1? [/INST]")
    cut = heldout_items(records[:1], locations[:1], tokenizer, max_prompt_length=8)[0]
    assert cut.prompt.input_ids == [tokenizer.bos_token_id] + items[0].prompt.input_ids[-7:]


def test_a_pretraining_file_has_no_prompts_but_the_world_asks_its_instructions(tokenizer, tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "docs.jsonl", [{"text": f"Document {i}."} for i in range(10)])
    from_file = PretrainDataModule(source, max_seq_length=64, val_split_fraction=0.2)
    from_file.connect(tokenizer)
    assert isinstance(from_file, HeldOut) and from_file.heldout() == [] and not from_file.checkable
    world = PretrainDataModule(EmbeddedWorld(num_train=20, num_heldout=4), max_seq_length=64)
    world.connect(tokenizer)
    items = world.heldout()
    assert world.checkable and len(items) == 4 and world.stats_val.examples == 100  # val: fresh prose documents
    assert all(item.prompt.text == format_alpaca_prompt(item.record["instruction"]) for item in items)


def test_an_instruction_file_is_held_out_but_not_checkable(tokenizer, tmp_path: Path) -> None:
    rows = [{"instruction": f"Repeat {i}.", "output": str(i)} for i in range(20)]
    dm = InstructionDataModule(_write_jsonl(tmp_path / "sft.jsonl", rows), val_split_fraction=0.2)
    dm.connect(tokenizer)
    items = dm.heldout()
    assert len(items) == 4 and not dm.checkable
    assert all(item.reference == item.record["output"] for item in items)


class _HeldOutOnly:
    """Anything with ``heldout()`` and ``checkable`` serves the evaluation: no DataModule attribute is read."""

    checkable = True

    def heldout(self) -> list[HeldOutItem]:
        return [HeldOutItem(Prompt("p1", [1, 5], "7"), "7", "add", {}),
                HeldOutItem(Prompt("p2", [1, 6], "3"), "3", "max", {}),
                HeldOutItem(Prompt("p3", [1, 7], "4"), "4", None, {})]


def test_the_generation_table_reads_the_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluation, "generate_and_measure",
                        lambda roles, prompts, n, b: (["7", "8", "4"][:len(prompts)], [], []))
    module = SimpleNamespace(model=None, tokenizer=None)
    table = GenerationTable(num_shown=2, num_scored=3)
    result = table.evaluate(SimpleNamespace(datamodule=_HeldOutOnly()), module, "after")
    assert result["exact_match"] == pytest.approx(2 / 3) and result["scored"] == 3
    assert result["per_task"] == {"add": 1.0, "all": 1.0, "max": 0.0}
    assert [p.text for p, _ in result["rows"]] == ["p1", "p2"]
    assert table.evaluate(SimpleNamespace(datamodule=object()), module, "before") == {}
