"""The settings of the data modules as a config sees them: the shared ones are written once, on the records base, and
each module passes them on with ``**kwargs``; jsonargparse (``lit-ft fit --data.help``, ``--print_config``, YAML
``data.init_args``) must still see every setting with its type, default and description."""

from __future__ import annotations

from typing import Any

import pytest
from jsonargparse import ArgumentParser

from lit_ft.data.formats import FORMATS, check_format_name
from lit_ft.data.instruction import InstructionDataModule, PretrainDataModule
from lit_ft.data.mixing import MixSource, Stopping
from lit_ft.data.preference import DPODataModule, PreferenceDataModule
from lit_ft.data.prompts import PromptDataModule
from lit_ft.data.records import Lengths, RecordSource, at_least
from lit_ft.data.sources import DataError

# (type, default) of every setting each module took before the shared ones moved to the base (the settings
# listed in the modules' own signatures then); the base's shared settings come first.
SHARED = {"source": (str | RecordSource | None, None), "split": (str, "train"), "val_source": (str | None, None),
          "val_split": (str | None, None), "val_split_fraction": (float, 0.05), "subset": (str | None, None),
          "max_examples": (int | None, None), "num_workers": (int, 0), "seed": (int, 42)}
TEXT = {**SHARED, "max_seq_length": (int, 512), "packing": (bool, True), "overlong": (str, "truncate"),
        "micro_batch_size": (int, 4), "sources": (list[MixSource] | None, None),
        "mix_stopping": (Stopping, "first_exhausted")}
INSTRUCTION = {**TEXT, "format": (str, "auto"), "chat_template": (str | None, None),
               "skip_empty_responses": (bool, True)}
PAIRS = {**SHARED, "format": (str, "auto"), "chat_template": (str | None, None), "max_seq_length": (int, 1024),
         "micro_batch_size": (int, 8)}
SURFACE = {
    InstructionDataModule: INSTRUCTION,
    PretrainDataModule: TEXT,
    PreferenceDataModule: {**PAIRS, "padding_side": (str, "right")},
    DPODataModule: {**PAIRS, "packing": (bool, True)},
    PromptDataModule: {**SHARED, "format": (str, "auto"), "chat_template": (str | None, None),
                       "max_prompt_length": (int, 256), "micro_batch_size": (int, 16)},
}


def _settings(module: type) -> dict[str, tuple[Any, Any, str | None]]:
    """What jsonargparse makes of a module's constructor: setting -> (type, default, description)."""
    parser = ArgumentParser()
    parser.add_class_arguments(module, "data")
    defaults = parser.get_defaults().data.as_dict()
    return {action.dest.removeprefix("data."): (action._typehint, defaults[action.dest.removeprefix("data.")],
                                                action.help)
            for action in parser._actions if action.dest.startswith("data.") and not action.dest.endswith(".help")}


@pytest.mark.parametrize("module", list(SURFACE), ids=lambda m: m.__name__)
def test_every_setting_keeps_its_type_default_and_description(module: type) -> None:
    settings = _settings(module)
    assert {name: (kind, default) for name, (kind, default, _) in settings.items()} == SURFACE[module]
    assert [name for name, (*_, help_text) in settings.items() if not help_text] == []  # none undocumented


@pytest.mark.parametrize("module", list(SURFACE), ids=lambda m: m.__name__)
def test_settings_other_than_the_source_are_given_by_name(module: type) -> None:
    with pytest.raises(TypeError):  # a second positional would land on another setting than it used to
        module("records.jsonl", "auto")
    assert module("records.jsonl", seed=7).seed == 7  # the source is positional, the rest pass through the base


def test_shared_settings_reach_the_base_and_its_checks() -> None:
    dm = PreferenceDataModule("pairs.jsonl", val_split="test", max_examples=10, num_workers=2)
    assert (dm.val_split, dm.max_examples, dm.num_workers, dm.micro_batch_size, dm.max_seq_length) == (
        "test", 10, 2, 8, 1024)
    assert dm.hparams["val_split"] == "test" and dm.hparams["padding_side"] == "right"
    with pytest.raises(DataError, match=r"^micro_batch_size must be >= 1, got 0$"):
        PromptDataModule("prompts.jsonl", micro_batch_size=0)
    with pytest.raises(DataError, match=r"^unknown preference format 'alpacca' \(expected auto, alpaca"):
        DPODataModule("pairs.jsonl", format="alpacca")
    with pytest.raises(DataError, match=r"^unknown prompt format 'text' \(expected auto, alpaca"):
        PromptDataModule("prompts.jsonl", format="text")
    with pytest.raises(DataError, match=r"^max_seq_length must be >= 2, got 1$"):
        InstructionDataModule("records.jsonl", max_seq_length=1)
    assert PretrainDataModule("docs.jsonl").format == "text"


def test_at_least_names_the_setting() -> None:
    assert at_least("max_seq_length", 2, 2) == 2
    with pytest.raises(DataError, match=r"^batch_size must be >= 1, got -3$"):
        at_least("batch_size", -3, 1)


def test_check_format_name() -> None:
    assert check_format_name("auto") == "auto" and check_format_name("chat") == "chat"
    with pytest.raises(DataError, match=r"^unknown format 'yaml' \(expected auto, " + ", ".join(FORMATS) + r"\)$"):
        check_format_name("yaml")
    with pytest.raises(DataError, match=r"^unknown prompt format 'x' \(expected auto, a, b\)$"):
        check_format_name("x", ("a", "b"), "prompt format")


def test_lengths_by_hand() -> None:
    assert Lengths.of([3, 4, 8]) == Lengths(5.0, 8) and str(Lengths.of([3, 4, 8])) == "mean 5.0, max 8"
    assert Lengths.of([]) == Lengths(0.0, 0) and str(Lengths.of([1200, 1201])) == "mean 1200.5, max 1,201"
