"""Bin packing, collators, overlong handling, stats and per-token example lengths."""

from __future__ import annotations

import random

import pytest
import torch

from lit_ft.data.formats import IGNORE_INDEX
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
from lit_ft.padding import example_lengths_from_attention_mask, example_lengths_from_position_ids

PAD = 0


def make_example(length: int, first_token: int = 10, supervised_from: int = 1) -> dict:
    """Token ids first_token, first_token+1, ...; labels -100 before ``supervised_from``, else the id."""
    ids = list(range(first_token, first_token + length))
    labels = [IGNORE_INDEX if i < supervised_from else t for i, t in enumerate(ids)]
    return {"input_ids": ids, "labels": labels}


def test_best_fit_decreasing_on_a_hand_example() -> None:
    # 5 opens row 0 (3 left); 4 opens row 1 (4 left); 3 fills row 0; 3 -> row 1 (1 left); 2 opens row 2;
    # 1 goes to the fullest row it fits: row 1.
    assert pack([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert pack([], 8) == []
    with pytest.raises(ValueError, match="outside 1..8"):
        pack([3, 9], 8)


def test_pack_random_lengths_properties() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(2000)]
    rows = pack(lengths, 512)
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert rows == pack(lengths, 512)  # deterministic
    assert len(rows) <= 1.05 * sum(lengths) / 512 + 1  # near the lower bound
    assert pack([make_example(4), make_example(5)], 9) == [[1, 0]]  # accepts examples too


def test_packed_rows_position_ids_labels_and_padding() -> None:
    examples = [make_example(3, 10, supervised_from=0), make_example(5, 20), make_example(4, 30, supervised_from=0)]
    store = ExampleStore(examples)
    dataset = PackedDataset(store, [[0, 1], [2]])
    batch = PackedCollator(pad_token_id=PAD)([dataset[0], dataset[1]])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 20, 21, 22, 23, 24]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    # The first label of every example is masked, even where the example itself supervised it.
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21, 22, 23, 24]
    # Row 1: one example of 4, then a padding segment with its own positions 0..3.
    assert batch["input_ids"][1].tolist() == [30, 31, 32, 33, PAD, PAD, PAD, PAD]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 31, 32, 33] + [IGNORE_INDEX] * 4


def test_packed_width_rounds_up_to_multiple() -> None:
    store = ExampleStore([make_example(9), make_example(3)])
    dataset = PackedDataset(store, [[0], [1]])
    batch = PackedCollator(pad_token_id=PAD, pad_to_multiple_of=8)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["position_ids"][0].tolist() == list(range(9)) + list(range(7))
    assert PackedCollator(pad_token_id=PAD, pad_to_multiple_of=1)([dataset[1]])["input_ids"].shape == (1, 3)


def test_padded_collator() -> None:
    store = ExampleStore([make_example(3), make_example(10, 40)])
    dataset = PaddedDataset(store)
    batch = PaddedCollator(pad_token_id=PAD)([dataset[0], dataset[1]])
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][0].tolist() == [1] * 3 + [0] * 13
    assert batch["attention_mask"][1].tolist() == [1] * 10 + [0] * 6
    assert batch["input_ids"][0, 3:].eq(PAD).all() and batch["labels"][0, 3:].eq(IGNORE_INDEX).all()
    assert batch["labels"][1, :10].tolist() == [IGNORE_INDEX, *range(41, 50)]
    assert batch["position_ids"][1, :10].tolist() == list(range(10))


def test_example_store_round_trip() -> None:
    examples = [make_example(3), make_example(1, 99), make_example(6, 50, supervised_from=4)]
    store = ExampleStore(examples)
    assert len(store) == 3 and store.lengths.tolist() == [3, 1, 6]
    assert store.supervised_counts.tolist() == [2, 0, 2]
    ids, labels = store.get(2)
    assert ids.tolist() == examples[2]["input_ids"] and labels.tolist() == examples[2]["labels"]
    assert len(ExampleStore([])) == 0


def test_stats_arithmetic() -> None:
    examples = [make_example(3), make_example(5), make_example(2)]  # supervised: 2 + 4 + 1 = 7
    store = ExampleStore(examples)
    rows = pack(examples, 8)
    assert rows == [[1, 0], [2]]
    stats = packed_stats("train", store, rows, 8, truncated=1, dropped=2)
    assert (stats.examples, stats.tokens, stats.supervised_tokens, stats.rows, stats.token_slots) == (3, 10, 7, 2, 16)
    assert stats.packing_efficiency == pytest.approx(10 / 16)
    assert (stats.truncated, stats.dropped) == (1, 2)
    line = str(stats)
    assert "\n" not in line and "62.5%" in line and "2 packed rows" in line
    # Padded in dataset order, micro-batch 2: [3, 5] -> 2 * 5, [2] -> 1 * 2.
    raw = padded_stats("val", store, micro_batch_size=2, pad_to_multiple_of=1)
    assert (raw.rows, raw.token_slots, raw.supervised_tokens) == (3, 12, 7)
    assert raw.packing_efficiency == pytest.approx(10 / 12)
    assert padded_stats("val", store, micro_batch_size=2).token_slots == 2 * 8 + 1 * 8  # widths rounded to 8


def test_truncate_and_drop_counts() -> None:
    examples = [make_example(4), make_example(10), make_example(12, supervised_from=9), make_example(8)]
    truncated = handle_overlong(examples, 8, "truncate")
    # The 12-token example only supervises tokens 9..11, all cut off: dropped rather than kept empty.
    assert (truncated.truncated, truncated.dropped) == (1, 1)
    assert [len(e["input_ids"]) for e in truncated.examples] == [4, 8, 8]
    assert truncated.examples[1]["input_ids"] == examples[1]["input_ids"][:8]
    dropped = handle_overlong(examples, 8, "drop")
    assert (dropped.truncated, dropped.dropped) == (0, 2)
    assert [len(e["input_ids"]) for e in dropped.examples] == [4, 8]
    with pytest.raises(ValueError, match="overlong"):
        handle_overlong(examples, 8, "split")


def test_example_lengths_from_position_ids() -> None:
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    expected = [[3, 3, 3, 2, 2, 4, 4, 4, 4], [6, 6, 6, 6, 6, 6, 3, 3, 3]]
    assert example_lengths_from_position_ids(position_ids).tolist() == expected
    assert example_lengths_from_position_ids(position_ids[0]).tolist() == expected[0]  # 1-D works too
    # Collated packed batch: each token gets its own example's length, padding its own segment's length.
    store = ExampleStore([make_example(3), make_example(2), make_example(4)])
    dataset = PackedDataset(store, [[0, 1], [2]])
    batch = PackedCollator(pad_token_id=PAD)([dataset[0], dataset[1]])
    assert example_lengths_from_position_ids(batch["position_ids"]).tolist() == [
        [3, 3, 3, 2, 2, 3, 3, 3],
        [4, 4, 4, 4, 4, 4, 4, 4],
    ]


def test_example_lengths_from_attention_mask() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert example_lengths_from_attention_mask(mask).tolist() == [[3] * 4, [4] * 4, [1] * 4]
