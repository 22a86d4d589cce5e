"""Supervised token sequences: instruction tuning (SFT) and raw-text pre-training.

Records are tokenized with their prompt masked (:func:`lit_ft.data.formats.tokenize_record`), overlong examples
truncated, dropped or refused, and the rest packed several to a row (position ids restart per example) or padded
one to a row (:mod:`lit_ft.data.packing`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from lit_ft.data.formats import FORMATS, IGNORE_INDEX, resolve_format, tokenize_record
from lit_ft.data.mixing import MixSource, Stopping, check_sources
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
from lit_ft.data.records import (
    MIN_SEQ_LENGTH,
    PAD_TO_MULTIPLE_OF,
    BuiltSplit,
    RecordsDataModule,
    RecordSource,
    at_least,
    progress,
)
from lit_ft.data.sources import DataError, Location

log = logging.getLogger("lit_ft")

OVERLONG_CHOICES = ("truncate", "drop", "error")  # error: fail on the first overlong example, naming it


@dataclass
class Tokenized:
    """Examples of some records, within ``max_seq_length``, and what became of the others."""

    examples: list[dict]
    truncated: int = 0  # cut to max_seq_length and kept
    dropped: int = 0  # overlong (overlong=drop), or nothing left to learn after truncation
    empty: int = 0  # skipped for an empty response
    first_empty: DataError | None = None  # the first of those, to name in the log


class InstructionDataModule(RecordsDataModule):
    """Loads, tokenizes, and packs (or pads) instruction data for supervised fine-tuning.

    Takes the settings every data module shares (:class:`lit_ft.data.records.RecordsDataModule`: split,
    val_source, val_split, val_split_fraction, subset, max_examples, chat_template, micro_batch_size (4: rows per
    batch on each device), num_workers, seed) plus its own:

    Args:
        source: Local file (.json, .jsonl, .json.gz, .jsonl.gz, .parquet), datasets-loadable directory, hub dataset
            id such as ``tatsu-lab/alpaca``, or a record source (``lit_ft.data.embedded.EmbeddedWorld``: the
            embedded tasks, whose answers are exactly checkable).
        format: auto (detect from the first record's keys, then required of all), alpaca, chat, prompt_completion
            or text.
        max_seq_length: Longest sequence (packed row or single example) in tokens (512: the reference recipe's).
        packing: Pack several examples per row (position ids restart per example) instead of padding.
        overlong: What to do with examples longer than max_seq_length: truncate, drop, or error (stop
            before training at the first one, naming its file and line).
        skip_empty_responses: Skip records whose response is empty, counting them (real Alpaca has 2 in
            5000); False fails on the first one, naming its file, line and field.
        sources: Several sources mixed by weight instead of ``source`` (:class:`lit_ft.data.mixing.MixSource`:
            source, weight, format, split, streaming...); see docs/data_mixing.md.
        mix_stopping: When the mix of ``sources`` ends: first_exhausted (the first source runs out) or
            all_exhausted (every source was seen whole; the smaller ones repeat).
    """

    shape = "instruction"
    formats = FORMATS

    def __init__(
        self,
        source: str | RecordSource | None = None,
        *,
        format: str = "auto",
        max_seq_length: int = 512,
        packing: bool = True,
        overlong: str = "truncate",
        skip_empty_responses: bool = True,
        sources: list[MixSource] | None = None,
        mix_stopping: Stopping = "first_exhausted",
        **kwargs: Any,
    ):
        super().__init__(source=source, format=format, **kwargs)
        if sources is not None:
            if source is not None:
                raise DataError("set data.source or data.sources, not both")
            self.sources = check_sources(sources, FORMATS)
            self.hparams["sources"] = [entry.describe() for entry in self.sources]
        if mix_stopping not in ("first_exhausted", "all_exhausted"):
            raise DataError(f"mix_stopping must be first_exhausted or all_exhausted, got '{mix_stopping}'")
        self.mix_stopping = mix_stopping
        if overlong not in OVERLONG_CHOICES:
            raise DataError(f"overlong must be one of {', '.join(OVERLONG_CHOICES)}, got '{overlong}'")
        self.max_seq_length = at_least("max_seq_length", max_seq_length, MIN_SEQ_LENGTH)
        self.packing = packing
        self.overlong = overlong
        self.skip_empty_responses = skip_empty_responses

    def build(self, name: str, records: list[dict], locations: list[Location]) -> BuiltSplit:
        """Tokenize (the format detected from the first record), apply the overlong policy, then pack or pad."""
        fmt = self.format
        if fmt == "auto" and records:  # an empty split tokenizes nothing, so "auto" can stay unresolved
            fmt = resolve_format("auto", records[0], locations[0])
        tokenized = self.tokenize(name, records, locations, fmt)
        if tokenized.empty:
            log.warning("%s: skipped %d records with an empty response, first: %s", name, tokenized.empty,
                        tokenized.first_empty)
            if rank_zero_only.rank == 0:
                print(f"[data] {name}: skipped {tokenized.empty} records with an empty response "
                      f"(first: {tokenized.first_empty})")
        if name == "train" and not tokenized.examples:
            raise DataError(f"no usable training examples ({tokenized.dropped} of {len(records)} dropped with "
                            f"overlong={self.overlong}, max_seq_length={self.max_seq_length})", self.source_label)
        return self.layout(name, tokenized, fmt)

    def tokenize(self, name: str, records: list[dict], locations: list[Location], fmt: str) -> Tokenized:
        """Records of one format -> examples within ``max_seq_length`` (the overlong policy applied), counting
        the records skipped for an empty response and the examples truncated or dropped. Also what a data mix
        (:mod:`lit_ft.data.mixing`) asks of each source, and a stream of each record."""
        examples, examples_at, empty = [], [], []
        for record, location in progress(records, locations, name):
            try:
                examples.append(tokenize_record(record, self.tokenizer, fmt, self.chat_template, location))
                examples_at.append(location)
            except DataError as err:
                if not (self.skip_empty_responses and err.problem == "empty response"):
                    raise
                empty.append(err)
        overlong = self.overlong
        if overlong == "error":
            _fail_on_overlong(examples, examples_at, self.max_seq_length)
            overlong = "drop"  # nothing is left to drop
        kept = handle_overlong(examples, self.max_seq_length, overlong)
        return Tokenized(kept.examples, kept.truncated, kept.dropped, len(empty), empty[0] if empty else None)

    def layout(self, name: str, tokenized: Tokenized, fmt: str | None) -> BuiltSplit:
        """Tokenized examples -> packed rows (or one padded example a row) and their stats."""
        store = ExampleStore(tokenized.examples)
        if self.packing:
            rows = pack(store.lengths.tolist(), self.max_seq_length)
            stats = packed_stats(name, store, rows, self.max_seq_length, tokenized.truncated, tokenized.dropped)
            dataset: Any = PackedDataset(store, rows)
        else:
            stats = padded_stats(name, store, self.micro_batch_size, PAD_TO_MULTIPLE_OF, tokenized.truncated,
                                 tokenized.dropped)
            dataset = PaddedDataset(store)
        stats.empty = tokenized.empty
        return BuiltSplit(dataset, stats, fmt)

    def collator(self) -> PackedCollator | PaddedCollator:
        """The collator for the layout in use; pads with the pad id (unk when the tokenizer has no pad)."""
        collator_cls = PackedCollator if self.packing else PaddedCollator
        return collator_cls(pad_token_id=self.pad_token_id(), pad_to_multiple_of=PAD_TO_MULTIPLE_OF)


class PretrainDataModule(InstructionDataModule):
    """Raw-text pre-training: format forced to ``text`` (records need a ``text`` field), packed, loss on all.

    The settings are :class:`InstructionDataModule`'s without ``format``, ``chat_template`` and
    ``skip_empty_responses`` (a document has no prompt and no response): ``max_seq_length`` is the row length
    (longer documents are truncated or dropped), ``packing`` packs several documents per row (the efficient
    default for pre-training), and ``sources`` mixes several text sources by weight.

    Args:
        source: Local file, datasets-loadable directory or hub dataset id with a ``text`` field, or a record source
            (``lit_ft.data.embedded.EmbeddedWorld``: the embedded corpus).
    """

    shape = "text"

    def __init__(self, source: str | RecordSource | None = None, **kwargs: Any):
        super().__init__(source=source, format="text", chat_template=None, skip_empty_responses=True, **kwargs)


def _fail_on_overlong(examples: list[dict], locations: list[Location], max_seq_length: int) -> None:
    """Raise a DataError naming the first example longer than ``max_seq_length`` (``overlong: error``)."""
    for example, location in zip(examples, locations):
        length = len(example["input_ids"])
        if length > max_seq_length:
            prompt = next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), length)
            part = f"its prompt alone is {prompt} tokens" if prompt >= max_seq_length else f"it is {length} tokens"
            raise DataError(f"longer than max_seq_length={max_seq_length}: {part} (overlong=error; truncate or "
                            "drop would keep going)", location)
