"""Preference data: drops and counts, batches of chosen-then-rejected rows, the DataModule on files and on the
embedded world."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.preference import PreferenceCollator, PreferenceDataModule, build_pairs
from lit_ft.data.records import ResumableDataLoader, SeededShuffleSampler
from lit_ft.data.sources import DataError, Location


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------ the module
def test_identical_and_empty_pairs_are_dropped_and_counted(tokenizer, tmp_path: Path, capsys) -> None:
    rows = [{"prompt": f"Say {i}.", "chosen": str(i), "rejected": str(i + 1), "margin": 0.5 * (i % 2)}
            for i in range(10)]
    rows[3]["rejected"] = rows[3]["chosen"]  # identical
    rows[4]["rejected"] = rows[4]["chosen"] + "   "  # identical after formatting (response whitespace)
    rows[5]["chosen"] = ""  # empty
    source = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(source=source, val_split_fraction=0.0, micro_batch_size=2)
    dm.connect(tokenizer)
    dm.setup("fit")
    stats = dm.stats_train
    assert (stats.records, stats.pairs, stats.identical, stats.empty, stats.too_long) == (10, 7, 2, 1, 0)
    assert stats.with_margin == 3 and dm.train_format == "prompt" and dm.prompt_format == "chat"
    printed = capsys.readouterr().out
    assert "[data] train: 7 pairs from 10 records" in printed and "dropped 2 identical, 1 empty" in printed


def test_bad_record_names_file_line_and_field(tokenizer, tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                   {"prompt": "p", "chosen": "a", "rejected": 3}])
    dm = PreferenceDataModule(source=source, val_split_fraction=0.0)
    dm.connect(tokenizer)
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'rejected'"):
        dm.setup("fit")
    with pytest.raises(DataError, match="unknown preference format"):
        PreferenceDataModule(source=source, format="pairs")


# --------------------------------------------------------------------------------------------- truncation
def test_overlong_pairs_in_a_split_are_cut_or_dropped(tokenizer) -> None:
    long_prompt = " ".join(["word"] * 60)
    records = [{"prompt": long_prompt, "chosen": "yes", "rejected": "no"},
               {"prompt": "short", "chosen": "a " * 80, "rejected": "b"}]
    pairs, stats = build_pairs(records, [Location("x", row=i) for i in range(2)], tokenizer, "auto", 32)
    assert (stats.pairs, stats.prompts_cut, stats.too_long) == (1, 1, 1)
    assert max(pairs[0].chosen_length, pairs[0].rejected_length) <= 32
    assert tokenizer.decode(pairs[0].prompt_ids).endswith("word [/INST]")


# ----------------------------------------------------------------------------------------------- batches
def test_collator_stacks_chosen_then_rejected_with_either_padding() -> None:
    items = [{"chosen_input_ids": torch.tensor([1, 5, 6, 2]), "rejected_input_ids": torch.tensor([1, 5, 2]),
              "margin": torch.tensor(0.5)},
             {"chosen_input_ids": torch.tensor([1, 7, 2]), "rejected_input_ids": torch.tensor([1, 7, 8, 9, 2]),
              "margin": torch.tensor(0.0)}]
    right = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=1)(items)
    left = PreferenceCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=1)(items)
    assert right["input_ids"].shape == (4, 5) and right["margin"].tolist() == [0.5, 0.0]
    assert right["input_ids"][0].tolist() == [1, 5, 6, 2, 0] and right["input_ids"][2].tolist() == [1, 5, 2, 0, 0]
    assert left["input_ids"][1].tolist() == [0, 0, 1, 7, 2] and left["input_ids"][3].tolist() == [1, 7, 8, 9, 2]
    assert right["attention_mask"].sum(-1).tolist() == left["attention_mask"].sum(-1).tolist() == [4, 3, 3, 5]
    # Position ids count real tokens, wherever the padding is.
    assert left["position_ids"][1].tolist()[2:] == [0, 1, 2] and right["position_ids"][1].tolist()[:3] == [0, 1, 2]
    with pytest.raises(DataError, match="padding_side"):
        PreferenceCollator(pad_token_id=0, padding_side="middle")


# ------------------------------------------------------------------------------------------ embedded pairs
def test_datamodule_batches_resume_and_left_padding(tokenizer) -> None:
    dm = PreferenceDataModule(EmbeddedWorld(num_train=40, num_heldout=8), micro_batch_size=4, padding_side="left")
    dm.connect(tokenizer)
    dm.setup("fit")
    assert (dm.stats_train.pairs, dm.stats_val.pairs) == (120, 24) and dm.prompt_format == "alpaca"  # 3 kinds
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, SeededShuffleSampler)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8 and batch["margin"].shape == (4,)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with a real token
    assert (batch["input_ids"][:, -1] == tokenizer.eos_token_id).all()
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[0] == 8


@pytest.mark.parametrize("row, field", [({"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt"),
                                        ({"instruction": "", "chosen": "a", "rejected": "b"}, "instruction"),
                                        ({"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"},
                                         "prompt[0].content"),
                                        ({"chosen": "\n\nHuman: \n\nAssistant: a",
                                          "rejected": "\n\nHuman: \n\nAssistant: b"}, "chosen")])
def test_an_empty_prompt_is_one_line_naming_file_line_and_field(tokenizer, tmp_path: Path, row, field) -> None:
    """The same rule as SFT data: an empty prompt is an error (before, an empty preference prompt was accepted)."""
    good = {key: ("Say yes." if key in ("prompt", "instruction") else value) for key, value in row.items()}
    if "prompt" not in row and "instruction" not in row:
        good = {"chosen": "\n\nHuman: Say yes.\n\nAssistant: yes", "rejected": "\n\nHuman: Say yes.\n\nAssistant: no"}
    source = _write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    dm = PreferenceDataModule(source=source, val_split_fraction=0.0)
    dm.connect(tokenizer)
    with pytest.raises(DataError, match=rf"pairs\.jsonl:2: field '{re.escape(field)}': empty prompt"):
        dm.setup()


def test_embedded_pairs_are_held_out_prompts_without_references(tokenizer) -> None:
    dm = PreferenceDataModule(EmbeddedWorld(num_train=16, num_heldout=4), max_seq_length=128)
    dm.connect(tokenizer)
    items = dm.heldout()
    assert not dm.checkable and len(items) == 4
    assert all(item.reference is None and item.prompt.text.endswith("### Response:\n") for item in items)


# ------------------------------------------------------------------------------------------------ judged pairs
def _judged(question: str, chosen: str, rejected: str) -> dict:
    return {"instruction": question, "input": "", "task": "add", "chosen": chosen, "rejected": rejected,
            "chosen_score": 2.0, "rejected_score": 0.0}


def test_judged_pairs_are_the_training_file_and_the_heldout_file(tokenizer, tmp_path: Path) -> None:
    from lit_ft.data.preference import JudgedPairs

    train = _write_jsonl(tmp_path / "train.jsonl", [_judged("What is 1 + 2?", "3", "4"),
                                                    _judged("What is 1 + 2?", "3 is the sum of 1 and 2.", "4"),
                                                    _judged("What is 2 + 2?", "4", "5")])
    heldout = _write_jsonl(tmp_path / "heldout.jsonl", [_judged("What is 5 + 2?", "7", "8"),
                                                        _judged("What is 5 + 2?", "7", "6"),
                                                        _judged("What is 6 + 1?", "7", "9")])
    dm = PreferenceDataModule(JudgedPairs(train, heldout), max_seq_length=128)
    dm.connect(tokenizer)
    dm.setup("fit")
    assert (dm.stats_train.pairs, dm.stats_val.pairs) == (3, 3)
    assert [item.prompt.text for item in dm.heldout()] == [dm.heldout()[0].prompt.text.replace("5 + 2", x)
                                                           for x in ("5 + 2", "6 + 1")]  # one per held-out prompt


def test_judged_pairs_refuse_a_heldout_prompt_that_was_trained_on(tmp_path: Path) -> None:
    from lit_ft.data.preference import JudgedPairs

    train = _write_jsonl(tmp_path / "train.jsonl", [_judged("What is 1 + 2?", "3", "4")])
    heldout = _write_jsonl(tmp_path / "heldout.jsonl", [_judged("What is 5 + 2?", "7", "8"),
                                                        _judged("What is 1 + 2?", "3", "5")])
    with pytest.raises(DataError, match=r"heldout\.jsonl: 1 held-out pair\(s\) ask a prompt of the training pairs, "
                                        r"e\.g\. 'What is 1 \+ 2\?'"):
        JudgedPairs(train, heldout).splits("preference")
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found \(`lit-ft pairs` writes it"):
        JudgedPairs(train, str(tmp_path / "missing.jsonl")).splits("preference")
    with pytest.raises(DataError, match="judged pairs are preference records; a 'prompt' stage cannot read them"):
        JudgedPairs(train, heldout).splits("prompt")
