"""The example data files of the README (examples/data/, one per record format) load with the data module of the
stage that reads them, detected as the format the README says."""

from __future__ import annotations

import pytest

from lit_ft.data.instruction import InstructionDataModule
from lit_ft.data.preference import PreferenceDataModule
from lit_ft.data.prompts import PromptDataModule
from tests.tiny_models import ROOT

DATA = ROOT / "examples" / "data"
SFT_FILES = {"alpaca.jsonl": "alpaca", "chat.jsonl": "chat", "prompt_completion.jsonl": "prompt_completion"}
PREFERENCE_FILES = {"preference.jsonl": "prompt", "hh.jsonl": "hh"}


def _loaded(module, tokenizer):
    module.connect(tokenizer)
    module.setup("fit")
    return module


def test_every_example_file_is_covered() -> None:
    assert {p.name for p in DATA.glob("*.jsonl")} == set(SFT_FILES) | set(PREFERENCE_FILES)


@pytest.mark.parametrize("name", sorted(SFT_FILES))
def test_sft_example_loads_as_its_format(name, tokenizer) -> None:
    dm = _loaded(InstructionDataModule(source=str(DATA / name), max_seq_length=128, micro_batch_size=4,
                                       val_split_fraction=0.0), tokenizer)
    assert dm.train_format == SFT_FILES[name]
    batch = next(iter(dm.train_dataloader()))
    assert (batch["labels"] != -100).any()  # answers to learn from


@pytest.mark.parametrize("name", sorted(PREFERENCE_FILES))
def test_preference_example_loads_as_its_format(name, tokenizer) -> None:
    dm = _loaded(PreferenceDataModule(source=str(DATA / name), max_seq_length=128, micro_batch_size=4,
                                      val_split_fraction=0.0), tokenizer)
    assert dm.train_format == PREFERENCE_FILES[name]
    assert len(dm.train_dataset) == 12  # no pair dropped


@pytest.mark.parametrize("name", ["alpaca.jsonl", "chat.jsonl", "preference.jsonl", "hh.jsonl"])
def test_examples_give_ppo_prompts(name, tokenizer) -> None:
    dm = _loaded(PromptDataModule(source=str(DATA / name), micro_batch_size=4, val_split_fraction=0.0), tokenizer)
    assert len(dm.train_dataset) >= 10
