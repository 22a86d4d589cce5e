"""Supervised token sequences: instruction tuning (SFT) and raw-text pre-training.

Records are tokenized with their prompt masked (:func:`lit_ft.data.formats.tokenize_record`), overlong examples
truncated, dropped or refused, and the rest packed several to a row (position ids restart per example) or padded
one to a row (:mod:`lit_ft.data.packing`).
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from lit_ft.data.formats import FORMATS, IGNORE_INDEX, resolve_format, tokenize_record
from lit_ft.data.packing import (
    ExampleStore,
    PackedCollator,
    PackedDataset,
    PaddedCollator,
    PaddedDataset,
    handle_overlong,
    pack,
    packed_stats,
    padded_stats,
)
from lit_ft.data.records import PAD_TO_MULTIPLE_OF, BuiltSplit, RecordsDataModule, RecordSource, progress
from lit_ft.data.sources import DataError, Location

log = logging.getLogger("lit_ft")

OVERLONG_CHOICES = ("truncate", "drop", "error")  # error: fail on the first overlong example, naming it


class InstructionDataModule(RecordsDataModule):
    """Loads, tokenizes, and packs (or pads) instruction data for supervised fine-tuning.

    Args:
        source: Local file (.json, .jsonl, .json.gz, .jsonl.gz, .parquet), datasets-loadable directory, hub dataset
            id such as ``tatsu-lab/alpaca``, or a record source (``lit_ft.data.embedded.EmbeddedWorld``: the
            embedded tasks, whose answers are exactly checkable).
        format: auto (detect from the first record's keys, then required of all), alpaca, chat, prompt_completion
            or text.
        split: Split of a hub dataset or directory to train on (ignored for single files).
        val_source: Separate validation data; when None, ``val_split_fraction`` of ``source`` is held out.
        val_split_fraction: Fraction of the training records held out for validation (0 disables).
        max_seq_length: Longest sequence (packed row or single example) in tokens (512: the reference recipe's).
        packing: Pack several examples per row (position ids restart per example) instead of padding.
        overlong: What to do with examples longer than max_seq_length: truncate, drop, or error (stop
            before training at the first one, naming its file and line).
        micro_batch_size: Rows per batch on each device.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: Seed for the validation split and the per-epoch shuffle.
        max_examples: Use only the first this many records of ``source`` (before the validation split).
        chat_template: Jinja chat template overriding the tokenizer's; "builtin" forces the built-in
            Mistral-instruct template.
        subset: Configuration name of a hub dataset.
        val_split: Split of ``val_source`` to use (default: ``split``).
        skip_empty_responses: Skip records whose response is empty, counting them (real Alpaca has 2 in
            5000); False fails on the first one, naming its file, line and field.
    """

    shape = "instruction"

    def __init__(
        self,
        source: str | RecordSource | None = None,
        format: str = "auto",
        split: str = "train",
        val_source: str | None = None,
        val_split_fraction: float = 0.05,
        max_seq_length: int = 512,
        packing: bool = True,
        overlong: str = "truncate",
        micro_batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 42,
        max_examples: int | None = None,
        chat_template: str | None = None,
        subset: str | None = None,
        val_split: str | None = None,
        skip_empty_responses: bool = True,
    ):
        super().__init__(source=source, format=format, split=split, val_source=val_source, val_split=val_split,
                         val_split_fraction=val_split_fraction, subset=subset, max_examples=max_examples,
                         chat_template=chat_template, micro_batch_size=micro_batch_size, num_workers=num_workers,
                         seed=seed)
        if format != "auto" and format not in FORMATS:
            raise DataError(f"unknown format '{format}' (expected auto, {', '.join(FORMATS)})")
        if overlong not in OVERLONG_CHOICES:
            raise DataError(f"overlong must be one of {', '.join(OVERLONG_CHOICES)}, got '{overlong}'")
        if max_seq_length < 2:
            raise DataError(f"max_seq_length must be >= 2, got {max_seq_length}")
        self.max_seq_length = max_seq_length
        self.packing = packing
        self.overlong = overlong
        self.skip_empty_responses = skip_empty_responses

    def build(self, name: str, records: list[dict], locations: list[Location]) -> BuiltSplit:
        """Tokenize (the format detected from the first record), apply the overlong policy, then pack or pad."""
        fmt = self.format
        if fmt == "auto" and records:  # an empty split tokenizes nothing, so "auto" can stay unresolved
            fmt = resolve_format("auto", records[0], locations[0])
        examples, examples_at, empty = [], [], []
        for record, location in progress(records, locations, name):
            try:
                examples.append(tokenize_record(record, self.tokenizer, fmt, self.chat_template, location))
                examples_at.append(location)
            except DataError as err:
                if not (self.skip_empty_responses and err.problem == "empty response"):
                    raise
                empty.append(err)
        if empty:
            log.warning("%s: skipped %d records with an empty response, first: %s", name, len(empty), empty[0])
            if rank_zero_only.rank == 0:
                print(f"[data] {name}: skipped {len(empty)} records with an empty response (first: {empty[0]})")
        overlong = self.overlong
        if overlong == "error":
            _fail_on_overlong(examples, examples_at, self.max_seq_length)
            overlong = "drop"  # nothing is left to drop
        kept = handle_overlong(examples, self.max_seq_length, overlong)
        if name == "train" and not kept.examples:
            raise DataError(f"no usable training examples ({kept.dropped} of {len(records)} dropped with "
                            f"overlong={self.overlong}, max_seq_length={self.max_seq_length})", self.source_label)
        store = ExampleStore(kept.examples)
        if self.packing:
            rows = pack(store.lengths.tolist(), self.max_seq_length)
            stats = packed_stats(name, store, rows, self.max_seq_length, kept.truncated, kept.dropped)
            dataset: Any = PackedDataset(store, rows)
        else:
            stats = padded_stats(name, store, self.micro_batch_size, PAD_TO_MULTIPLE_OF, kept.truncated, kept.dropped)
            dataset = PaddedDataset(store)
        stats.empty = len(empty)
        return BuiltSplit(dataset, stats, fmt)

    def collator(self) -> PackedCollator | PaddedCollator:
        """The collator for the layout in use; pads with the pad id (unk when the tokenizer has no pad)."""
        collator_cls = PackedCollator if self.packing else PaddedCollator
        return collator_cls(pad_token_id=self.pad_token_id(), pad_to_multiple_of=PAD_TO_MULTIPLE_OF)


class PretrainDataModule(InstructionDataModule):
    """Raw-text pre-training: format forced to ``text`` (records need a ``text`` field), packed, loss on all.

    Args:
        source: Local file, datasets-loadable directory or hub dataset id with a ``text`` field, or a record source
            (``lit_ft.data.embedded.EmbeddedWorld``: the embedded corpus).
        split: Split of a hub dataset or directory to train on (ignored for single files).
        val_source: Separate validation data; when None, ``val_split_fraction`` of ``source`` is held out.
        val_split_fraction: Fraction of the training records held out for validation (0 disables).
        max_seq_length: Row length in tokens; longer documents are truncated or dropped.
        packing: Pack several documents per row (the efficient default for pre-training).
        overlong: What to do with documents longer than max_seq_length: truncate or drop.
        micro_batch_size: Rows per batch on each device.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: Seed for the validation split and the per-epoch shuffle.
        max_examples: Use only the first this many records of ``source``.
        subset: Configuration name of a hub dataset.
        val_split: Split of ``val_source`` to use (default: ``split``).
    """

    shape = "text"

    def __init__(
        self,
        source: str | RecordSource | None = None,
        split: str = "train",
        val_source: str | None = None,
        val_split_fraction: float = 0.05,
        max_seq_length: int = 512,
        packing: bool = True,
        overlong: str = "truncate",
        micro_batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 42,
        max_examples: int | None = None,
        subset: str | None = None,
        val_split: str | None = None,
    ):
        super().__init__(source=source, format="text", split=split, val_source=val_source,
                         val_split_fraction=val_split_fraction, max_seq_length=max_seq_length, packing=packing,
                         overlong=overlong, micro_batch_size=micro_batch_size, num_workers=num_workers,
                         seed=seed, max_examples=max_examples, chat_template=None, subset=subset,
                         val_split=val_split)


def _fail_on_overlong(examples: list[dict], locations: list[Location], max_seq_length: int) -> None:
    """Raise a DataError naming the first example longer than ``max_seq_length`` (``overlong: error``)."""
    for example, location in zip(examples, locations):
        length = len(example["input_ids"])
        if length > max_seq_length:
            prompt = next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), length)
            part = f"its prompt alone is {prompt} tokens" if prompt >= max_seq_length else f"it is {length} tokens"
            raise DataError(f"longer than max_seq_length={max_seq_length}: {part} (overlong=error; truncate or "
                            "drop would keep going)", location)
