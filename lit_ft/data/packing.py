"""Fit tokenized examples into fixed-length rows and collate them into tensors.

Packed rows concatenate several examples; ``position_ids`` restart at 0 at each example, which is how the
model knows where one example ends (no attention mask is sent). Padded batches hold one example per row
with an ``attention_mask``. :class:`DataStats` reports how many token slots carry real tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from lit_ft.data.formats import IGNORE_INDEX
from lit_ft.padding import round_up

OVERLONG_MODES = ("truncate", "drop")


@dataclass
class OverlongResult:
    """Examples that fit ``max_seq_length`` and how many were cut or removed to get there."""

    examples: list[dict]
    truncated: int  # cut to max_seq_length and kept
    dropped: int  # removed: too long with overlong="drop", or nothing left to learn after truncation


def handle_overlong(examples: Sequence[dict], max_seq_length: int, overlong: str = "truncate") -> OverlongResult:
    """Keep the first ``max_seq_length`` tokens of long examples ("truncate") or remove them ("drop").

    A truncated example whose remaining labels are all -100 (the response was cut off entirely) is
    dropped, since it would contribute no loss.
    """
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
    kept: list[dict] = []
    truncated = dropped = 0
    for example in examples:
        if len(example["input_ids"]) <= max_seq_length:
            kept.append(example)
        elif overlong == "drop":
            dropped += 1
        else:
            labels = example["labels"][:max_seq_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                dropped += 1
                continue
            kept.append({"input_ids": example["input_ids"][:max_seq_length], "labels": labels})
            truncated += 1
    return OverlongResult(kept, truncated, dropped)


def pack(examples: Sequence[dict] | Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing; returns rows of example indices, each row's length <= max.

    ``examples`` are dicts with ``input_ids`` or plain lengths. Deterministic: ties in length keep
    dataset order, and an example goes to the fullest row it fits in (the oldest such row on ties).
    """
    lengths = [e if isinstance(e, int) else len(e["input_ids"]) for e in examples]
    for i, length in enumerate(lengths):
        if not 0 < length <= max_seq_length:
            raise ValueError(f"example {i} has length {length}, outside 1..{max_seq_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index) of rows that are not full
    for i in order:
        length = lengths[i]
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            remaining, row = free.pop(slot)
            remaining -= length
            rows[row].append(i)
        else:
            row, remaining = len(rows), max_seq_length - length
            rows.append([i])
        if remaining > 0:
            bisect.insort(free, (remaining, row))
    return rows


class ExampleStore:
    """Tokenized examples in two flat int32 tensors plus offsets (compact, cheap to share with workers)."""

    def __init__(self, examples: Sequence[dict]):
        lengths = [len(e["input_ids"]) for e in examples]
        self.offsets = torch.zeros(len(examples) + 1, dtype=torch.long)
        if lengths:
            self.offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
        flat_ids = [token for e in examples for token in e["input_ids"]]
        flat_labels = [label for e in examples for label in e["labels"]]
        self.input_ids = torch.tensor(flat_ids, dtype=torch.int32)
        self.labels = torch.tensor(flat_labels, dtype=torch.int32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        """Length of each example (LongTensor)."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def supervised_counts(self) -> torch.Tensor:
        """Number of labels != -100 in each example (LongTensor)."""
        mask = (self.labels != IGNORE_INDEX).long()
        cumulative = torch.cat([torch.zeros(1, dtype=torch.long), mask.cumsum(0)])
        return cumulative[self.offsets[1:]] - cumulative[self.offsets[:-1]]

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of one example as LongTensors."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.input_ids[start:end].long(), self.labels[start:end].long()


class PackedDataset(Dataset):
    """Each item is one packed row: its examples concatenated, with per-example position ids."""

    def __init__(self, store: ExampleStore, rows: list[list[int]]):
        self.store = store
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        parts = [self.store.get(i) for i in self.rows[index]]
        input_ids = torch.cat([ids for ids, _ in parts])
        labels = torch.cat([lab for _, lab in parts])
        position_ids = torch.cat([torch.arange(len(ids)) for ids, _ in parts])
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class PaddedDataset(Dataset):
    """Each item is one example (padding happens in :class:`PaddedCollator`)."""

    def __init__(self, store: ExampleStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids, labels = self.store.get(index)
        return {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(len(input_ids))}


def _right_pad(items: list[dict[str, torch.Tensor]], pad_token_id: int, multiple: int) -> dict[str, torch.Tensor]:
    """Stack ``input_ids``/``labels`` right-padded to the batch's longest (rounded up), plus ``lengths``."""
    width = round_up(max(len(item["input_ids"]) for item in items), multiple)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.tensor([len(item["input_ids"]) for item in items])
    for b, item in enumerate(items):
        input_ids[b, : lengths[b]] = item["input_ids"]
        labels[b, : lengths[b]] = item["labels"]
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}


@dataclass
class _RightPadCollator:
    """What both collators share: right-pad the batch's items to its longest (rounded up)."""

    pad_token_id: int
    pad_to_multiple_of: int = 8  # tensor-core friendly shapes, and fewer distinct shapes to compile

    def _right_padded(self, items: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """The padded batch, each item's length, and the batch width."""
        batch = _right_pad(items, self.pad_token_id, self.pad_to_multiple_of)
        return batch, batch.pop("lengths"), batch["input_ids"].shape[1]


@dataclass
class PackedCollator(_RightPadCollator):
    """Stack packed rows; pads each row to the batch's longest (rounded up) as a separate pad segment.

    Returns ``input_ids``, ``labels``, ``position_ids`` (B, L) LongTensors and no attention mask. The
    first label of every example is -100 so no example learns to predict across a boundary.
    """

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch, lengths, width = self._right_padded(items)
        position_ids = torch.zeros_like(batch["input_ids"])
        for b, item in enumerate(items):
            n = int(lengths[b])
            position_ids[b, :n] = item["position_ids"]
            position_ids[b, n:] = torch.arange(width - n)  # the padding is its own segment
        batch["labels"][position_ids == 0] = IGNORE_INDEX
        batch["position_ids"] = position_ids
        return batch


@dataclass
class PaddedCollator(_RightPadCollator):
    """Right-pad single examples to the batch's longest (rounded up), with an ``attention_mask``."""

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch, lengths, width = self._right_padded(items)
        batch["labels"][:, 0] = IGNORE_INDEX
        batch["position_ids"] = torch.arange(width).expand(len(items), width).clone()
        batch["attention_mask"] = (torch.arange(width)[None] < lengths[:, None]).long()
        return batch


@dataclass
class DataStats:
    """Token accounting for one split, logged once at setup."""

    name: str
    packed: bool
    examples: int  # examples kept (after dropping)
    tokens: int  # real tokens, BOS/EOS included
    supervised_tokens: int  # labels != -100 as the collator emits them
    rows: int  # sequences the dataloader yields: packed rows, or examples when padding
    token_slots: int  # positions paid for: rows * max_seq_length when packed, padded batch area otherwise
    truncated: int = 0
    dropped: int = 0
    empty: int = 0  # records skipped because their response was empty
    packing_efficiency: float = field(init=False)  # tokens / token_slots

    def __post_init__(self) -> None:
        self.packing_efficiency = self.tokens / self.token_slots if self.token_slots else 0.0

    def __str__(self) -> str:
        layout = "packed rows" if self.packed else "padded rows"
        return (f"{self.name}: {self.examples:,} examples -> {self.rows:,} {layout}, {self.tokens:,} tokens "
                f"({self.supervised_tokens:,} supervised) in {self.token_slots:,} slots, "
                f"efficiency {self.packing_efficiency:.1%}, truncated {self.truncated:,}, "
                f"dropped {self.dropped:,}" + (f", empty responses skipped {self.empty:,}" if self.empty else ""))


def _supervised_tokens(store: ExampleStore, rows: list[list[int]] | None) -> int:
    """Supervised labels after collation: an example's first label is always -100 once packed."""
    counts = store.supervised_counts
    if rows is not None:
        first_labels = store.labels[store.offsets[:-1]] if len(store) else store.labels[:0]
        counts = counts - (first_labels != IGNORE_INDEX).long()
    return int(counts.sum())


def packed_stats(name: str, store: ExampleStore, rows: list[list[int]], max_seq_length: int,
                 truncated: int = 0, dropped: int = 0) -> DataStats:
    """Stats for packed rows; every row is charged ``max_seq_length`` slots."""
    return DataStats(name=name, packed=True, examples=len(store), tokens=int(store.lengths.sum()),
                     supervised_tokens=_supervised_tokens(store, rows), rows=len(rows),
                     token_slots=len(rows) * max_seq_length, truncated=truncated, dropped=dropped)


def padded_stats(name: str, store: ExampleStore, micro_batch_size: int, pad_to_multiple_of: int = 8,
                 truncated: int = 0, dropped: int = 0) -> DataStats:
    """Stats for padded micro-batches taken in dataset order; each batch costs size * padded longest."""
    lengths = store.lengths.tolist()
    slots = 0
    for start in range(0, len(lengths), micro_batch_size):
        chunk = lengths[start:start + micro_batch_size]
        slots += len(chunk) * round_up(max(chunk), pad_to_multiple_of)
    return DataStats(name=name, packed=False, examples=len(store), tokens=sum(lengths),
                     supervised_tokens=_supervised_tokens(store, None), rows=len(store), token_slots=slots,
                     truncated=truncated, dropped=dropped)
