"""The records base: record sources, the validation split, the seeded resumable order, and the connect contract."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.instruction import InstructionDataModule, PretrainDataModule
from lit_ft.data.preference import PreferenceDataModule
from lit_ft.data.prompts import PromptDataModule
from lit_ft.data.records import RecordsDataModule, RecordSource, RecordSplits, SeededShuffleSampler
from lit_ft.data.sources import DataError


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


class PlusOne:
    """A record source of the user's own: prompt/completion records generated on the fly."""

    def splits(self, shape: str) -> RecordSplits:
        train = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(20)]
        return RecordSplits(train, [{"prompt": "1+1=", "completion": "2"}], checkable=True)


# ----------------------------------------------------------------------------------------- the seeded order
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


# -------------------------------------------------------------------------------------------- record sources
def test_a_record_source_object_and_the_trainer_tokenizer(tokenizer) -> None:
    assert isinstance(PlusOne(), RecordSource) and isinstance(EmbeddedWorld(), RecordSource)
    dm = InstructionDataModule(PlusOne(), max_examples=10)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tokenizer))
    dm.setup("fit")
    assert dm.tokenizer is tokenizer  # unconnected: setup connected to the module's tokenizer
    assert dm.train_format == "prompt_completion"
    assert (dm.stats_train.examples, dm.stats_val.examples) == (10, 1)
    assert [item.record for item in dm.heldout()] == [{"prompt": "1+1=", "completion": "2"}]
    assert dm.checkable and dm.heldout()[0].reference == "2"


@pytest.mark.parametrize("module", [InstructionDataModule, PretrainDataModule, PreferenceDataModule,
                                    PromptDataModule])
def test_every_module_needs_a_source(module, tokenizer) -> None:
    dm = module()
    dm.connect(tokenizer)
    with pytest.raises(DataError, match=r"no data source given: .*lit_ft\.data\.embedded\.EmbeddedWorld"):
        dm.setup()
    with pytest.raises(DataError, match="source must be a file, a hub dataset id or a record source"):
        module(source=3)


def test_file_split_is_seeded_and_max_examples_comes_first(tokenizer, tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    dm = InstructionDataModule(source, val_split_fraction=0.25, max_examples=20)
    train, train_loc, val, val_loc = dm.load_splits()
    assert (len(train), len(val)) == (15, 5) and {r["prompt"] for r in train + val} == {f"q{i}" for i in range(20)}
    assert [str(loc) for loc in val_loc] == [f"{source}:{int(r['prompt'][1:]) + 1}" for r in val]
    again = InstructionDataModule(source, val_split_fraction=0.25, max_examples=20).load_splits()
    assert again[2] == val and len(train_loc) == 15


# ---------------------------------------------------------------------------------------------- connect
def test_connect_sets_tokenizer_batch_size_and_lengths(tokenizer) -> None:
    dm = InstructionDataModule(EmbeddedWorld(num_train=24, num_heldout=4), max_seq_length=128, micro_batch_size=2)
    dm.connect(tokenizer, batch_size=3, max_seq_length=64)
    assert (dm.tokenizer, dm.micro_batch_size, dm.max_seq_length) == (tokenizer, 3, 64)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 3
    assert dm.stats_train.token_slots == dm.stats_train.rows * 64  # packed rows of the connected length
    dm.connect(tokenizer, max_seq_length=96)  # a change after setup: the next setup rebuilds
    dm.setup("fit")
    assert dm.stats_train.token_slots == dm.stats_train.rows * 96
    prompts = PromptDataModule(EmbeddedWorld(num_train=8, num_heldout=2), max_prompt_length=256)
    prompts.connect(tokenizer, max_seq_length=16)  # a prompt never exceeds the longest sequence
    assert prompts.max_prompt_length == 16
    prompts.setup("fit")
    assert max(len(p.input_ids) for p in prompts.train_prompts) == 16
    assert max(len(item.prompt.input_ids) for item in prompts.heldout()) <= 16
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        dm.connect(tokenizer, batch_size=0)


class _CountingModule(L.LightningModule):
    """The smallest module with a ``tokenizer``: one weight, a loss that reads the batch."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.rows = 0

    def training_step(self, batch, batch_idx):
        self.rows += batch["input_ids"].shape[0]
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.weight], lr=0.1)


def test_plain_trainer_fit_connects_to_the_module_tokenizer(tokenizer) -> None:
    dm = InstructionDataModule(EmbeddedWorld(num_train=16, num_heldout=2), max_seq_length=64, micro_batch_size=2)
    assert dm.tokenizer is None
    module = _CountingModule(tokenizer)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    assert dm.tokenizer is tokenizer and module.rows == 4


def test_the_cli_connects_the_data_module_to_the_model_tokenizer(tmp_path: Path) -> None:
    from lit_ft.cli import LitFtCLI

    config = {"model": {"class_path": "lit_ft.stages.causal_lm.CausalLM",
                        "init_args": {"backbone": {"pretrained": None}}},
              "data": {"class_path": "lit_ft.data.instruction.InstructionDataModule",
                       "init_args": {"source": {"class_path": "lit_ft.data.embedded.EmbeddedWorld"}}},
              "trainer": {"logger": False, "default_root_dir": str(tmp_path)}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    cli = LitFtCLI(args=["--config", str(path)], run=False)
    assert isinstance(cli.datamodule, RecordsDataModule) and cli.datamodule.tokenizer is None  # nothing loaded yet
    cli.before_fit()  # LightningCLI runs before_<subcommand> right before trainer.<subcommand>
    assert cli.datamodule.tokenizer is not None and cli.datamodule.tokenizer is cli.model.tokenizer
    assert {"before_fit", "before_validate", "before_test"} <= set(vars(LitFtCLI))


# ---------------------------------------------------------------------------------------- checkpointing
def test_state_dict_names_the_layout_and_a_change_warns(tokenizer, caplog) -> None:
    dm = InstructionDataModule(EmbeddedWorld(num_train=16, num_heldout=2), max_seq_length=64)
    dm.connect(tokenizer)
    dm.setup("fit")
    assert dm.state_dict() == {"seed": 42, "format": "alpaca", "max_seq_length": 64, "packing": True}
    prompts = PromptDataModule(EmbeddedWorld(num_train=8, num_heldout=2), max_prompt_length=32)
    assert prompts.state_dict() == {"seed": 42, "format": None, "max_prompt_length": 32}
    with caplog.at_level(logging.WARNING, logger="lit_ft"):
        dm.load_state_dict({"seed": 42, "format": "alpaca", "max_seq_length": 128, "packing": True})
    assert "max_seq_length 128 -> 64" in caplog.text


def test_hyperparameters_describe_the_source_as_plain_data(tmp_path: Path) -> None:
    """Checkpoints carry the data module's hyperparameters; a record source object in them would not load with
    torch's default ``weights_only=True``."""
    from lightning.fabric.utilities.cloud_io import _load

    dm = PreferenceDataModule(EmbeddedWorld(num_train=8, num_heldout=2), max_seq_length=64)
    assert dm.hparams["source"] == {"class_path": "lit_ft.data.embedded.EmbeddedWorld",
                                    "init_args": {"num_train": 8, "num_heldout": 2, "world_seed": 1234,
                                                  "answer_styles": None,
                                                  "corpus": {"extra_facts": 2000, "sentences_per_doc": 6},
                                                  "pairs": {"labels": "gold", "kinds": ["style", "correctness", "cross"],
                                                            "misses": ["swap", "off_by_one"], "rejected_per_fact": 1, "extra_facts": 0},
                                                  "prompts": {"tasks": None, "balance_tasks": False, "extra_facts": 0}}}
    assert dm.hparams["max_seq_length"] == 64 and InstructionDataModule("a.jsonl").hparams["source"] == "a.jsonl"
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams)}, tmp_path / "x.ckpt")
    assert _load(tmp_path / "x.ckpt")["datamodule_hyper_parameters"]["source"] == dm.hparams["source"]
