"""Prompts for PPO: the prompt side of instruction, prompt-only or preference data, left-padded for generation.

The same sources as SFT and the reward model (a local file, a hub dataset id, or the embedded world), and the
same rendering (:func:`lit_ft.data.prompt_formats.record_prompt`): an instruction record gives the prompt SFT
trained on, a prompt-only record (``instruction`` or ``prompt`` alone) its prompt, a preference record the shared
prompt of its pair. Where a record carries an answer (Alpaca ``output``, a chat's last assistant turn, a
completion), it becomes the prompt's ``reference``; programmatic rewards such as exact match read it.

Batches are ``input_ids`` and ``attention_mask`` (left padding: every prompt ends in the last column, where
generation continues) plus ``index``, the position of each prompt in :attr:`PromptDataModule.train_prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from lit_ft.data.formats import Prompt
from lit_ft.data.prompt_formats import PROMPT_FORMATS, cut_prompt, record_prompt, record_task
from lit_ft.data.records import BuiltSplit, Lengths, RecordsDataModule, RecordSource, progress
from lit_ft.data.sources import DataError, Location
from lit_ft.padding import pad_rows

__all__ = ["PROMPT_FORMATS", "LeftPadCollator", "PromptDataModule", "PromptDataset", "PromptStats", "cut_prompt",
           "record_prompt"]


@dataclass
class PromptStats:
    """Counts and lengths of one split, printed once at setup."""

    name: str
    records: int
    prompts: int
    cut: int = 0  # kept, with the prompt cut from the left to max_prompt_length
    with_reference: int = 0
    lengths: Lengths = field(default_factory=Lengths)  # token lengths of the prompts, after the cut

    @property
    def examples(self) -> int:
        return self.prompts

    @property
    def dropped(self) -> int:
        return self.records - self.prompts

    def __str__(self) -> str:
        return (f"{self.name}: {self.prompts:,} prompts from {self.records:,} records; tokens {self.lengths}; "
                f"cut from the left {self.cut:,}; "
                f"{self.with_reference:,} with a reference answer")


class PromptDataset(Dataset):
    """Prompts as token-id tensors, with their index (the module looks records and references up by it)."""

    def __init__(self, prompts: list[Prompt], tasks: list[str | None] | None = None):
        self.prompts = prompts
        self.tasks = tasks or [None] * len(prompts)  # each prompt's task family (embedded data), for per-task metrics
        self.ids = [torch.tensor(p.input_ids, dtype=torch.long) for p in prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.ids[index], "index": index}


@dataclass
class LeftPadCollator:
    """Left-pads prompts to one width: ``input_ids``, ``attention_mask`` (B, L) and ``index`` (B,)."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_rows([item["input_ids"] for item in items], self.pad_token_id, "left")
        index = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "index": index}


class PromptDataModule(RecordsDataModule):
    """Prompts for PPO from instruction, prompt-only or preference data, or the embedded world's tasks.

    The training prompts are shuffled per epoch with a seeded generator and resume exactly from a checkpoint.
    The held-out prompts (:meth:`heldout`) are what the PPO module scores before and after training.

    Takes the settings every data module shares (:class:`lit_ft.data.records.RecordsDataModule`: split,
    val_source (separate held-out prompts), val_split, val_split_fraction, subset, max_examples, chat_template,
    num_workers, seed) plus its own:

    Args:
        source: local file (.json, .jsonl, .json.gz, .parquet), datasets-loadable directory or hub id; instruction
            records (Alpaca, chat, prompt/completion), prompt-only records (``instruction`` or ``prompt`` alone) or
            preference records (prompt/chosen/rejected, HH). Or a record source
            (``lit_ft.data.embedded.EmbeddedWorld``: the SFT tasks, whose answers are exactly checkable; its
            ``prompts`` settings choose the task families).
        format: auto (per record) or one of alpaca, chat, prompt_completion, prompt, hh.
        max_prompt_length: longer prompts lose tokens from the left, BOS kept (256: the embedded prompts are ~40).
        micro_batch_size: prompts per rollout batch on each device.
    """

    shape = "prompt"
    formats = PROMPT_FORMATS
    format_noun = "prompt format"

    def __init__(
        self,
        source: str | RecordSource | None = None,
        *,
        format: str = "auto",
        max_prompt_length: int = 256,
        micro_batch_size: int = 16,
        **kwargs: Any,
    ):
        super().__init__(source=source, format=format, micro_batch_size=micro_batch_size, **kwargs)
        if max_prompt_length < 2:
            raise DataError(f"max_prompt_length must be at least 2, got {max_prompt_length}")
        self.max_prompt_length = max_prompt_length

    @property
    def train_prompts(self) -> list[Prompt]:
        """The training prompts, indexed by a batch's ``index``."""
        return self.train_dataset.prompts if self.train_dataset is not None else []

    def build(self, name: str, records: list[dict], locations: list[Location]) -> BuiltSplit:
        """Render each record's prompt (its format resolved per record: instruction and preference records may
        mix), cut from the left to ``max_prompt_length``."""
        prompts: list[Prompt] = []
        cut = 0
        for record, location in progress(records, locations, name):
            prompt = record_prompt(record, self.tokenizer, self.format, self.chat_template, location)
            ids = cut_prompt(prompt.input_ids, self.max_prompt_length)
            cut += len(ids) < len(prompt.input_ids)
            prompts.append(Prompt(prompt.text, ids, prompt.reference))
        stats = PromptStats(name, len(records), len(prompts), cut=cut,
                            with_reference=sum(p.reference is not None for p in prompts),
                            lengths=Lengths.of([len(p.input_ids) for p in prompts]))
        if name == "train" and not prompts:
            raise DataError(f"no usable prompts in {len(records)} records", self.source_label)
        return BuiltSplit(PromptDataset(prompts, [record_task(record) for record in records]), stats, self.format)

    def collator(self) -> LeftPadCollator:
        return LeftPadCollator(self.pad_token_id())
