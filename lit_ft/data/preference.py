"""Preference pairs: datasets, batches and the DataModules of the reward model and of DPO.

Records become token pairs in :mod:`lit_ft.data.preference_formats` (formats, HH transcripts, truncation); this
module stores them and batches them. The embedded pairs come from :class:`lit_ft.data.embedded.EmbeddedWorld`.

* :class:`PreferenceDataModule` (the reward model): B pairs as 2B rows, chosen rows first, then rejected rows.
* :class:`DPODataModule` (DPO and its variants): the same pairs with ``labels`` (the response tokens) and each
  pair's dataset ``index`` (precomputed reference log-probs are looked up by it), in one of two layouts: padded
  (2B rows, chosen rows then rejected rows, as TRL and torchtune concatenate them) or packed (one row holding
  ``chosen_0 rejected_0 chosen_1 rejected_1 ...``, position ids restarting per example, a pair never split).
  :func:`pair_values` reads per-example results of either layout back as (B, 2).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lit_ft.data.formats import IGNORE_INDEX, Prompt
from lit_ft.data.gold import parse_question
from lit_ft.data.heldout import HeldOutItem
from lit_ft.data.packing import ExampleStore
from lit_ft.data.preference_formats import (
    PREFERENCE_FORMATS,
    EmptyResponse,
    PreferencePair,
    detect_preference_format,
    encode_prompt_response,
    hh_turns,
    parse_hh,
    prompt_messages,
    resolve_preference_format,
    split_shared_prompt,
    tokenize_pair,
    truncate_pair,
)
from lit_ft.data.records import (
    MIN_SEQ_LENGTH,
    BuiltSplit,
    Lengths,
    RecordsDataModule,
    RecordShape,
    RecordSource,
    RecordSplits,
    at_least,
    progress,
)
from lit_ft.data.sources import DataError, Location, load_records_with_locations
from lit_ft.padding import pad_rows, position_ids_from_mask, round_up

PADDING_SIDES = ("right", "left")

__all__ = [
    "PADDING_SIDES",
    "PREFERENCE_FORMATS",
    "DPODataModule",
    "EmptyResponse",
    "JudgedPairs",
    "PackedPairCollator",
    "PaddedPairCollator",
    "PairStats",
    "PreferenceCollator",
    "PreferenceDataModule",
    "PreferenceDataset",
    "PreferencePair",
    "build_pairs",
    "detect_preference_format",
    "encode_prompt_response",
    "hh_turns",
    "pair_stats",
    "pair_values",
    "parse_hh",
    "prompt_messages",
    "resolve_preference_format",
    "split_shared_prompt",
    "tokenize_pair",
    "truncate_pair",
]


# ------------------------------------------------------------------------------------------ judged pairs
PROMPT_KEYS = ("instruction", "input", "prompt", "messages")  # what makes two records the same prompt


@dataclass(frozen=True)
class JudgedPairs:
    """The pairs ``lit-ft pairs`` wrote (a policy's own samples, ranked by a judge) as a record source for the reward
    model (shape ``preference``): the training file, and the held-out file as validation and held-out accuracy.

    A prompt in both files is an error, not a warning: the held-out accuracy would count questions the reward model
    trained on. In YAML (``configs/rm.yaml``)::

        source:
          class_path: lit_ft.data.preference.JudgedPairs
          init_args: {train: artifacts/pairs/train.jsonl, heldout: artifacts/pairs/heldout.jsonl}

    Args:
        train: JSONL of the training pairs (``lit-ft pairs --embedded train``: SFT training questions and fresh ones).
        heldout: JSONL of the held-out pairs (``lit-ft pairs --embedded heldout``: the held-out questions).
    """

    train: str = "artifacts/pairs/train.jsonl"
    heldout: str = "artifacts/pairs/heldout.jsonl"

    def splits(self, shape: RecordShape) -> RecordSplits:
        if shape != "preference":
            raise DataError(f"judged pairs are preference records; a '{shape}' stage cannot read them")
        train, heldout = self._read(self.train), self._read(self.heldout)
        seen = {_prompt_key(r) for r in train}
        shared = [r for r in heldout if _prompt_key(r) in seen]
        if shared:
            raise DataError(f"{len(shared)} held-out pair(s) ask a prompt of the training pairs, e.g. "
                            f"{shared[0].get('instruction', shared[0].get('prompt'))!r}", self.heldout)
        first = {_prompt_key(r): r for r in reversed(heldout)}  # one record per held-out prompt, for its prompt
        return RecordSplits(train, heldout, heldout=list(reversed(first.values())))

    @staticmethod
    def _read(path: str) -> list[dict]:
        if not Path(path).expanduser().is_file():
            raise DataError("file not found (`lit-ft pairs` writes it; `make pairs` for the embedded world)", path)
        records, _ = load_records_with_locations(path)
        if not records:
            raise DataError("no records", path)
        return records


def _prompt_key(record: dict) -> str:
    return json.dumps([record.get(k) for k in PROMPT_KEYS])


# ------------------------------------------------------------------------------------------ datasets, batches
@dataclass
class PairStats:
    """Counts and lengths of one split, logged once at setup."""

    name: str
    records: int
    pairs: int
    identical: int = 0  # dropped: both responses tokenize identically
    empty: int = 0  # dropped: an empty assistant turn
    too_long: int = 0  # dropped: the longer response does not fit max_seq_length
    prompts_cut: int = 0  # kept, with the prompt cut from the left
    with_margin: int = 0
    prompt: Lengths = field(default_factory=Lengths)  # token lengths of the kept pairs' prompts (after truncation)
    response: Lengths = field(default_factory=Lengths)  # of their responses, chosen and rejected
    sequence: Lengths = field(default_factory=Lengths)  # of prompt + response, chosen and rejected

    @property
    def examples(self) -> int:
        return self.pairs

    @property
    def dropped(self) -> int:
        return self.identical + self.empty + self.too_long

    def __str__(self) -> str:
        margin = f", {self.with_margin:,} with a margin" if self.with_margin else ""
        return (f"{self.name}: {self.pairs:,} pairs from {self.records:,} records{margin}; tokens per sequence "
                f"{self.sequence} (prompt {self.prompt}; response {self.response}); "
                f"prompts cut {self.prompts_cut:,}; dropped {self.identical:,} identical, {self.empty:,} empty, "
                f"{self.too_long:,} too long")


def pair_stats(name: str, records: int, pairs: Sequence[PreferencePair], **counts: int) -> PairStats:
    """Stats of the kept pairs (lengths after truncation) plus the drop counts."""
    return PairStats(name=name, records=records, pairs=len(pairs), **counts,
                     with_margin=sum(p.margin != 0 for p in pairs),
                     prompt=Lengths.of([len(p.prompt_ids) for p in pairs]),
                     response=Lengths.of([len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]),
                     sequence=Lengths.of([n for p in pairs for n in (p.chosen_length, p.rejected_length)]))


def build_pairs(records: Sequence[dict], locations: Sequence[Location], tokenizer: Any, format: str,
                max_seq_length: int, chat_template: str | None = None, name: str = "train"
                ) -> tuple[list[PreferencePair], PairStats]:
    """Tokenize, drop (identical, empty, too long) and truncate the pairs of one split."""
    kept: list[PreferencePair] = []
    counts = {"identical": 0, "empty": 0, "too_long": 0, "prompts_cut": 0}
    for record, location in progress(list(records), list(locations), name):
        try:
            pair = tokenize_pair(record, tokenizer, format, chat_template, location)
        except EmptyResponse:
            counts["empty"] += 1
            continue
        if pair.chosen_ids == pair.rejected_ids:
            counts["identical"] += 1
            continue
        cut = truncate_pair(pair, max_seq_length)
        if cut is None:
            counts["too_long"] += 1
            continue
        counts["prompts_cut"] += cut is not pair
        kept.append(cut)
    return kept, pair_stats(name, len(records), kept, **counts)


class PreferenceDataset(Dataset):
    """Pairs as two compact :class:`ExampleStore` s (prompt + chosen, prompt + rejected), their margins and prompt
    lengths. An item carries its ``index`` (DPO looks its precomputed reference log-probs up by it)."""

    def __init__(self, pairs: Sequence[PreferencePair]):
        def store(side: str) -> ExampleStore:
            examples = []
            for p in pairs:
                response = getattr(p, side)
                examples.append({"input_ids": p.prompt_ids + response,
                                 "labels": [IGNORE_INDEX] * len(p.prompt_ids) + response})
            return ExampleStore(examples)

        self.chosen = store("chosen_ids")
        self.rejected = store("rejected_ids")
        self.margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
        self.prompt_lengths = torch.tensor([len(p.prompt_ids) for p in pairs], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.margins)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"chosen_input_ids": self.chosen.get(index)[0], "rejected_input_ids": self.rejected.get(index)[0],
                "margin": self.margins[index], "prompt_length": int(self.prompt_lengths[index]), "index": index}


@dataclass
class PreferenceCollator:
    """B pairs -> 2B rows: chosen rows first, then rejected rows, padded to one width.

    Returns ``input_ids``, ``attention_mask`` and ``position_ids`` (2B, L) and ``margin`` (B,). Position ids count
    real tokens only, so left- and right-padded rows give the same hidden states.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int = 8

    def __post_init__(self) -> None:
        if self.padding_side not in PADDING_SIDES:
            raise DataError(f"padding_side must be 'right' or 'left', got '{self.padding_side}'")

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [item["chosen_input_ids"] for item in items] + [item["rejected_input_ids"] for item in items]
        input_ids, attention_mask = pad_rows(rows, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        position_ids = position_ids_from_mask(attention_mask)
        margin = torch.stack([torch.as_tensor(item.get("margin", 0.0), dtype=torch.float32) for item in items])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "margin": margin}


def _labelled(item: dict[str, Any], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of one side of a pair: the labels are the response tokens, -100 on the prompt."""
    ids = item[f"{side}_input_ids"]
    labels = ids.clone()
    labels[: item["prompt_length"]] = IGNORE_INDEX
    return ids, labels


@dataclass
class PaddedPairCollator:
    """B pairs -> 2B right-padded rows, chosen rows first, then rejected rows (TRL's and torchtune's order).

    Returns ``input_ids``, ``labels`` (-100 on prompt and padding), ``attention_mask`` and ``position_ids`` (2B, L),
    and ``index`` (B,), each pair's position in its dataset.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sides = [_labelled(item, side) for side in ("chosen", "rejected") for item in items]
        input_ids, attention_mask = pad_rows([ids for ids, _ in sides], self.pad_token_id, "right",
                                             self.pad_to_multiple_of)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (_, label) in enumerate(sides):
            labels[row, : len(label)] = label
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "position_ids": position_ids_from_mask(attention_mask),
                "index": torch.tensor([item["index"] for item in items], dtype=torch.long)}


@dataclass
class PackedPairCollator:
    """B pairs -> one packed row ``chosen_0 rejected_0 chosen_1 rejected_1 ...``: no padding between examples, a
    pair never split, position ids restarting at 0 for each example (attention stays within an example with
    ``attn_implementation: lit_ft_packed``, which costs sum(L_i^2), or with transformers' block-diagonal mask).

    Returns ``input_ids``, ``labels`` (-100 on prompts and padding) and ``position_ids`` (1, L), with no attention
    mask; the row is padded at its end to a multiple of ``pad_to_multiple_of`` as a segment of its own.
    ``real_segments`` (S,) flags each segment (in row order) that is an example rather than that padding, and
    ``index`` (B,) gives each pair's position in its dataset.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sides = [_labelled(item, side) for item in items for side in ("chosen", "rejected")]
        length = sum(len(ids) for ids, _ in sides)
        pad = round_up(length, self.pad_to_multiple_of) - length
        input_ids = torch.cat([ids for ids, _ in sides] + [torch.full((pad,), self.pad_token_id, dtype=torch.long)])
        labels = torch.cat([label for _, label in sides] + [torch.full((pad,), IGNORE_INDEX, dtype=torch.long)])
        position_ids = torch.cat([torch.arange(len(ids)) for ids, _ in sides] + [torch.arange(pad)])
        real = torch.tensor([True] * len(sides) + [False] * (pad > 0))
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None],
                "real_segments": real, "index": torch.tensor([item["index"] for item in items], dtype=torch.long)}


def pair_values(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example values of a :class:`DPODataModule` batch (one per row when padded, one per segment when
    packed, as :func:`lit_ft.losses.preference.sequence_logps` gives them) as (B, 2): chosen, rejected."""
    if "real_segments" in batch:
        return values[batch["real_segments"]].view(-1, 2)
    return values.view(2, -1).T


# ------------------------------------------------------------------------------------------------ DataModule
class PreferenceDataModule(RecordsDataModule):
    """Preference pairs for the reward model: a file, a hub dataset, or the embedded world's pairs.

    Batches hold B pairs as 2B rows (chosen rows, then rejected rows) with ``attention_mask``, ``position_ids``
    and ``margin``. The training order is a seeded shuffle that resumes exactly from a checkpoint.

    Takes the settings every data module shares (:class:`lit_ft.data.records.RecordsDataModule`: split,
    val_source, val_split (``test`` for ``Anthropic/hh-rlhf``), val_split_fraction, subset, max_examples (of
    ``source``, or embedded training pairs), chat_template, num_workers, seed) plus its own:

    Args:
        source: local file (.json, .jsonl, .json.gz, .jsonl.gz, .parquet), datasets-loadable directory or hub id
            (e.g. ``Anthropic/hh-rlhf``), or a record source (``lit_ft.data.embedded.EmbeddedWorld``: pairs of the
            SFT facts, chosen the right answer, rejected a near miss; its ``pairs`` settings choose how many).
        format: auto (detect from the first record), alpaca, prompt, chat or hh.
        max_seq_length: longest sequence (prompt + one response) in tokens; prompts are cut from the left to fit
            (1024: HH conversations fit whole, with rare exceptions).
        padding_side: "right" (default) or "left"; the reward is read at each row's last real token either way.
        micro_batch_size: pairs per batch on each device (2x rows).
    """

    shape = "preference"
    formats = PREFERENCE_FORMATS
    format_noun = "preference format"

    def __init__(
        self,
        source: str | RecordSource | None = None,
        *,
        format: str = "auto",
        max_seq_length: int = 1024,
        padding_side: str = "right",
        micro_batch_size: int = 8,
        **kwargs: Any,
    ):
        super().__init__(source=source, format=format, micro_batch_size=micro_batch_size, **kwargs)
        if padding_side not in PADDING_SIDES:
            raise DataError(f"padding_side must be 'right' or 'left', got '{padding_side}'")
        self.max_seq_length = at_least("max_seq_length", max_seq_length, MIN_SEQ_LENGTH)
        self.padding_side = padding_side

    @property
    def prompt_format(self) -> str | None:
        """How prompts are rendered: "alpaca" or "chat" (what a scorer must reproduce), None before setup."""
        if self.train_format is None or self.train_format == "auto":
            return None
        return "alpaca" if self.train_format == "alpaca" else "chat"

    def build(self, name: str, records: list[dict], locations: list[Location]) -> BuiltSplit:
        """Tokenize the pairs (the format detected from the first record), dropping and counting the unusable."""
        fmt = self.format
        if fmt == "auto" and records:
            fmt = resolve_preference_format("auto", records[0], locations[0])
        pairs, stats = build_pairs(records, locations, self.tokenizer, fmt, self.max_seq_length, self.chat_template,
                                   name)
        if name == "train" and not pairs:
            raise DataError(f"no usable training pairs ({stats.dropped} of {len(records)} dropped: {stats.identical} "
                            f"identical, {stats.empty} empty, {stats.too_long} too long for "
                            f"max_seq_length={self.max_seq_length})", self.source_label)
        return BuiltSplit(PreferenceDataset(pairs), stats, fmt)

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(pad_token_id=self.pad_token_id(), padding_side=self.padding_side)


# No line of the docstring below may start with a role such as ``:class:``: docstring_parser would read it as reST
# and ``lit-ft fit --data.help`` would lose the argument descriptions.
class DPODataModule(PreferenceDataModule):
    """Preference pairs for DPO and its variants (IPO, hinge, robust, SimPO): the pairs of the reward model's
    data module (:class:`PreferenceDataModule`), batched with their response ``labels`` and dataset ``index``.

    With ``packing`` (the default) a micro-batch of B pairs is one row, each pair's chosen and rejected side by
    side (:class:`PackedPairCollator`); without, 2B right-padded rows (:class:`PaddedPairCollator`). Either way
    chosen and rejected go through the model in one forward pass. The arguments are the reward model's (its
    docstring documents ``source`` and ``format``), without ``padding_side`` (log-probs do not depend on it),
    plus ``packing``.

    Args:
        packing: one packed row per micro-batch (True: no compute is spent on padding; pair it with
            ``attn_implementation: lit_ft_packed`` so that attention costs sum(L_i^2)), or padded rows.
    """

    def __init__(self, source: str | RecordSource | None = None, *, packing: bool = True, **kwargs: Any):
        super().__init__(source=source, padding_side="right", **kwargs)
        self.packing = packing

    def collator(self) -> PackedPairCollator | PaddedPairCollator:
        layout = PackedPairCollator if self.packing else PaddedPairCollator
        return layout(pad_token_id=self.pad_token_id())

    # DPO's held-out evaluation generates answers: where the data has a gold judge (the embedded world), each
    # held-out question carries its own answer, so exact match applies though the held-out *pairs* name none.
    def heldout(self) -> list[HeldOutItem]:
        """The held-out prompts; with a gold judge on the source, each with its question's answer as reference."""
        items = super().heldout()
        if getattr(self.source, "gold_judge", None) is None:
            return items
        answered = []
        for item in items:
            question = parse_question(item.prompt.text)
            if question is None:
                return items
            prompt = Prompt(item.prompt.text, item.prompt.input_ids, question.answer)
            answered.append(dataclasses.replace(item, prompt=prompt, reference=question.answer))
        return answered

    @property
    def checkable(self) -> bool:
        """True when every held-out item's reference is the one right answer: the records say so, or the gold
        judge's questions give them (see :meth:`heldout`)."""
        if self._checkable:
            return True
        items = self.heldout() if getattr(self.source, "gold_judge", None) is not None else []
        return bool(items) and all(item.reference is not None for item in items)
