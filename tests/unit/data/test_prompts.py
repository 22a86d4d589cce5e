"""PPO prompts: the prompt side of instruction, prompt-only and preference records, left-padded batches, the
embedded tasks, and the empty-prompt rule."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from lit_ft.data.embedded import EmbeddedWorld, PromptSettings
from lit_ft.data.formats import format_alpaca_prompt
from lit_ft.data.prompt_formats import cut_prompt, record_prompt
from lit_ft.data.prompts import LeftPadCollator, PromptDataModule
from lit_ft.data.sources import DataError
from lit_ft.data.synthetic import split_facts
from tests.tiny_models import ROOT

HH_FILE = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_test.jsonl.gz"


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _data(tokenizer, source: str | EmbeddedWorld | None = None, **settings) -> PromptDataModule:
    dm = PromptDataModule(source or EmbeddedWorld(num_train=32, num_heldout=4), **{"micro_batch_size": 8, **settings})
    dm.connect(tokenizer)
    return dm


def test_prompts_come_from_instruction_or_preference_records(tokenizer) -> None:
    alpaca = record_prompt({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, tokenizer)
    assert alpaca.reference == "5" and alpaca.text.endswith("### Response:\n")
    pair = record_prompt({"instruction": "Add 2 and 3.", "chosen": "5", "rejected": "6"}, tokenizer)
    assert pair.input_ids == alpaca.input_ids and pair.reference is None
    hh = record_prompt({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!",
                        "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."}, tokenizer)
    assert tokenizer.decode(hh.input_ids).endswith("Hi there [/INST]") and hh.reference is None
    assert cut_prompt([1, 5, 6, 7, 8], 3) == [1, 7, 8] and cut_prompt([1, 5], 3) == [1, 5]


def test_a_prompts_only_file_gives_prompts_without_references(tokenizer, tmp_path: Path) -> None:
    """Issue 21: ``{"prompt": ...}`` or ``{"instruction": ...}`` alone used to be refused, asking for ``output``."""
    rows = [{"instruction": "Add 2 and 3."}, {"prompt": "Say hi."},
            {"prompt": [{"role": "user", "content": "Name a colour."}]}]
    dm = _data(tokenizer, _write_jsonl(tmp_path / "prompts.jsonl", rows), val_split_fraction=0.0)
    dm.setup("fit")
    alpaca, plain, chat = dm.train_prompts
    assert alpaca.text == format_alpaca_prompt("Add 2 and 3.")
    assert alpaca.input_ids == record_prompt({"instruction": "Add 2 and 3.", "output": "5"}, tokenizer).input_ids
    assert plain.input_ids == [tokenizer.bos_token_id] + tokenizer.encode("Say hi.", add_special_tokens=False)
    assert tokenizer.decode(chat.input_ids).endswith("[INST] Name a colour. [/INST]")
    assert all(p.reference is None for p in dm.train_prompts) and dm.stats_train.with_reference == 0
    # format: prompt reads a string prompt as one user turn, as the reward model's preference records render it.
    as_turn = record_prompt({"prompt": "Say hi."}, tokenizer, "prompt")
    assert tokenizer.decode(as_turn.input_ids) == "<s> [INST] Say hi. [/INST]"
    # An instruction record under a preference format is still read as what it is.
    assert record_prompt({"instruction": "Add 2 and 3."}, tokenizer, "hh").input_ids == alpaca.input_ids


@pytest.mark.parametrize("row, field", [({"instruction": " "}, "instruction"), ({"prompt": ""}, "prompt"),
                                        ({"prompt": [{"role": "user", "content": ""}]}, "prompt[0].content")])
def test_an_empty_prompt_is_one_line_naming_file_line_and_field(tokenizer, tmp_path: Path, row, field) -> None:
    source = _write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "Say yes."}, row])
    dm = _data(tokenizer, source, val_split_fraction=0.0)
    with pytest.raises(DataError, match=rf"prompts\.jsonl:2: field '{re.escape(field)}': empty prompt"):
        dm.setup()


@pytest.mark.skipif(not HH_FILE.exists(), reason=f"{HH_FILE} is absent (the real HH-RLHF file lives in ../shared/data)")
def test_prompt_side_of_real_hh_pairs(tokenizer, tmp_path) -> None:
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        rows = [next(f) for _ in range(40)]
    source = tmp_path / "hh.jsonl"
    source.write_text("".join(rows))
    dm = _data(tokenizer, str(source), val_split_fraction=0.1, max_prompt_length=64)
    dm.setup("fit")
    assert len(dm.train_prompts) == 36 and len(dm.heldout()) == 4
    assert all(len(p.input_ids) <= 64 and p.input_ids[0] == tokenizer.bos_token_id for p in dm.train_prompts)
    assert all(tokenizer.decode(p.input_ids).endswith("[/INST]") for p in dm.train_prompts)
    assert all(len(item.prompt.input_ids) <= 64 for item in dm.heldout())  # held out: cut the same way


def test_embedded_prompts_batch_left_padded_and_resume(tokenizer) -> None:
    dm = _data(tokenizer)
    dm.setup("fit")
    assert dm.checkable and all(p.reference for p in dm.train_prompts + [i.prompt for i in dm.heldout()])
    batch = LeftPadCollator(0)([dm.train_dataset[i] for i in (0, 1, 2)])
    assert (batch["attention_mask"][:, -1] == 1).all()  # every prompt ends in the last column
    lengths = [len(dm.train_prompts[i].input_ids) for i in (0, 1, 2)]
    assert batch["attention_mask"].sum(-1).tolist() == lengths and batch["index"].tolist() == [0, 1, 2]


def test_embedded_prompts_by_task_family(tokenizer) -> None:
    """The families and their balance are the world's prompt settings (test_embedded checks the records)."""
    _, heldout = split_facts(1234, 200, 20)
    world = EmbeddedWorld(num_train=200, num_heldout=20, prompts=PromptSettings(tasks=["add", "sort"],
                                                                                balance_tasks=True))
    dm = _data(tokenizer, world)
    dm.setup("fit")
    balanced = world.splits("prompt").train
    assert [p.reference for p in dm.train_prompts] == [r["output"] for r in balanced]
    assert dm.train_dataset.tasks == [r["task"] for r in balanced] and set(dm.train_dataset.tasks) == {"add", "sort"}
    # The held-out prompts keep every family, so exact match compares with the SFT stage's.
    tasks = [item.task for item in dm.heldout()]
    assert tasks == [f.task for f in heldout] and len(set(tasks)) > 2
    with pytest.raises(DataError, match="unknown embedded task"):
        PromptSettings(tasks=["add", "divide"])
    with pytest.raises(TypeError):  # the families are the world's: a file source cannot be given them
        PromptDataModule(source="prompts.jsonl", balance_tasks=True)
