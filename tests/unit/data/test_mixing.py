"""data.sources: the weighted draws, a loaded mix (its statistics and its share), and one-line faults."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.instruction import InstructionDataModule, PretrainDataModule
from lit_ft.data.mixing import MixDraws, MixSource, check_sources, interleave, pass_order
from lit_ft.data.sources import DataError
from tests.tiny_models import ROOT

SHARE_TOLERANCE = 0.02  # the bound: the logged mix within 2 points of the weights


def alpaca_file(path: Path, n: int, empty_every: int = 0) -> str:
    rows = [{"instruction": f"Double {i}.", "input": "",
             "output": "" if empty_every and i % empty_every == 0 else str(2 * i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def completion_file(path: Path, n: int) -> str:
    rows = [{"prompt": f"{i} squared is", "completion": f" {i * i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def shared_alpaca() -> Path | None:
    """``../shared/data/alpaca_5000.json`` beside the checkout (or beside its parent, for a worktree)."""
    for parent in (ROOT.parent, ROOT.parent.parent):
        path = parent / "shared" / "data" / "alpaca_5000.json"
        if path.is_file():
            return path
    return None


# ------------------------------------------------------------------------------------------------ the draws
def test_draws_follow_the_weights_and_are_a_function_of_seed_and_index() -> None:
    draws = MixDraws([0.7, 0.3], seed=3)
    first = [draws[k] for k in range(10_000)]
    assert abs(Counter(first)[0] / 10_000 - 0.7) < 0.015
    again = MixDraws([7, 3], seed=3)  # weights are relative
    assert [again[k] for k in reversed(range(10_000))] == first[::-1]  # any order of access, same draws
    assert first != [MixDraws([0.7, 0.3], seed=4)[k] for k in range(10_000)]
    assert {MixDraws([0.0, 1.0], seed=0)[k] for k in range(100)} == {1}


def test_interleave_by_hand() -> None:
    """Two sources of 3 and 2 items: every item once, in each source's seeded order, ending as the rule says."""
    weights, seed = [0.5, 0.5], 0
    draws = MixDraws(weights, seed)
    order = interleave([3, 2], weights, seed, "first_exhausted")
    counts = Counter(source for source, _ in order)
    assert counts[0] <= 3 and counts[1] <= 2 and (counts[0] == 3 or counts[1] == 2)
    assert [source for source, _ in order] == [draws[k] for k in range(len(order))]
    for source, size in ((0, 3), (1, 2)):  # each source's items in its pass-0 order
        assert [item for s, item in order if s == source] == pass_order(size, seed, source, 0)[:counts[source]]
    everything = interleave([3, 2], weights, seed, "all_exhausted")
    assert {(s, i) for s, i in everything} == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}
    assert everything[: len(order)] == order


def test_interleave_share_matches_weights() -> None:
    order = interleave([7000, 3000], [0.7, 0.3], seed=1)
    assert abs(Counter(s for s, _ in order)[0] / len(order) - 0.7) < SHARE_TOLERANCE
    unequal = interleave([100, 10_000], [0.5, 0.5], seed=1, stopping="all_exhausted")
    counts = Counter(s for s, _ in unequal)
    assert counts[1] == 10_000 and counts[0] > 9000  # the small source repeats, each pass in a new order


# ----------------------------------------------------------------------------------------- one-line faults
@pytest.mark.parametrize(("entries", "message"), [
    ([{"source": "missing/dir/data.jsonl"}],
     r"^data.sources\[0\] \(data.jsonl\): file not found: missing/dir/data.jsonl"),
    ([{"source": "A", "format": "yaml"}], r"^data.sources\[0\] \(A\): unknown format 'yaml' \(expected auto, alpaca"),
    ([{"source": "A", "weight": 1.0}, {"source": "B", "weight": -0.5}],
     r"^data.sources\[1\] \(B\): weight -0.5 is negative"),
    ([{"source": "A", "weight": 0}, {"source": "B", "weight": 0.0}], r"^data.sources: the weights sum to 0;"),
    ([{"source": "A", "weight": float("nan")}], r"weight must be a finite number"),
    ([], r"data.sources is empty"),
    ([{"source": "A", "wieght": 1}], r"^data.sources\[0\]: .*unexpected keyword argument 'wieght'"),
    ([{"source": "A", "val_records": 5}], r"val_records applies to streamed sources"),
])
def test_a_bad_source_is_one_line_naming_it(entries, message) -> None:
    with pytest.raises(DataError, match=message) as err:
        InstructionDataModule(sources=entries)
    assert "\n" not in str(err.value)


def test_source_and_sources_together_and_unusable_sources(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="set data.source or data.sources, not both"):
        InstructionDataModule(source="x.jsonl", sources=[{"source": "y.jsonl"}])
    empty = alpaca_file(tmp_path / "empty.jsonl", 4, empty_every=1)
    dm = InstructionDataModule(sources=[{"source": alpaca_file(tmp_path / "a.jsonl", 8)}, {"source": empty}],
                               val_split_fraction=0.0)
    dm.connect(tokenizer)
    with pytest.raises(DataError, match=r"^data.sources\[1\] \(empty.jsonl\): no usable training examples"):
        dm.setup("fit")
    assert check_sources([MixSource("owner/name", weight=2)], ("alpaca",))[0].weight == 2  # a hub id: checked at setup


# --------------------------------------------------------------------------------------------- a loaded mix
def test_mix_of_two_formats_counts_each_source_and_follows_the_weights(tokenizer, tmp_path: Path, capsys) -> None:
    sources = [{"source": alpaca_file(tmp_path / "alpaca.jsonl", 600, empty_every=50), "weight": 3},
               {"source": completion_file(tmp_path / "squares.jsonl", 400), "weight": 1, "name": "squares"}]
    dm = InstructionDataModule(sources=sources, val_split_fraction=0.05, max_seq_length=64, seed=5)
    dm.connect(tokenizer)
    dm.setup("fit")
    alpaca, squares = dm.mix_stats
    assert (alpaca.format, squares.format) == ("alpaca", "prompt_completion")
    assert (alpaca.records, squares.records) == (570, 380)  # 5% of each held out for validation
    assert alpaca.dropped == {"empty response": sum(1 for i in range(600) if i % 50 == 0) - _held_empty(dm)}
    assert alpaca.examples == 570 - alpaca.dropped["empty response"] and squares.examples == 380
    share = alpaca.mixed_examples / (alpaca.mixed_examples + squares.mixed_examples)
    assert abs(share - 0.75) < SHARE_TOLERANCE
    assert alpaca.mixed_examples == alpaca.examples  # first_exhausted: the mix ends when alpaca runs out
    assert dm.stats_train.examples == alpaca.mixed_examples + squares.mixed_examples
    assert dm.stats_val.examples == 30 + 20 - _held_empty(dm)
    assert dm.train_format == "alpaca"  # the heaviest source's, as the run records it
    out = capsys.readouterr().out
    assert "[data] mix of 2 sources (seed 5, first_exhausted)" in out
    assert "squares: weight 25.0%, 380 records read, 380 examples" in out and "(empty response)" not in out
    assert f"dropped {alpaca.dropped['empty response']} ({alpaca.dropped['empty response']} empty response)" in out

    again = InstructionDataModule(sources=sources, val_split_fraction=0.05, max_seq_length=64, seed=5)
    again.connect(tokenizer)
    again.setup("fit")
    assert _rows(again) == _rows(dm)  # deterministic under the seed
    other = InstructionDataModule(sources=sources, val_split_fraction=0.05, max_seq_length=64, seed=6)
    other.connect(tokenizer)
    other.setup("fit")
    assert _rows(other) != _rows(dm)


def _held_empty(dm: InstructionDataModule) -> int:
    """Empty-response records that fell into alpaca's validation split (they are skipped there)."""
    return sum(1 for item in dm._heldout_records if item.get("output") == "")


def _rows(dm) -> list[list[int]]:
    return [dm.train_dataset[i]["input_ids"].tolist() for i in range(len(dm.train_dataset))]


def test_a_record_source_in_the_mix_keeps_exact_match_on_its_heldout(tokenizer, tmp_path: Path) -> None:
    world = EmbeddedWorld(num_train=60, num_heldout=6)
    dm = InstructionDataModule(sources=[MixSource(world, 0.5), MixSource(alpaca_file(tmp_path / "a.jsonl", 60), 0.5)],
                               max_seq_length=128)
    dm.connect(tokenizer)
    dm.setup("fit")
    assert dm.checkable and len(dm.heldout()) == 6  # the file's held-out answers are not the only right ones
    assert dm.state_dict()["sources"][0]["source"]["class_path"] == "lit_ft.data.embedded.EmbeddedWorld"
    assert dm.hparams["sources"][1]["weight"] == 0.5


def test_pretraining_mix_reads_every_source_as_text(tokenizer, tmp_path: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(30)))
    dm = PretrainDataModule(sources=[{"source": str(docs)}, {"source": str(docs), "name": "again"}],
                            max_seq_length=64, val_split_fraction=0.0)
    dm.connect(tokenizer)
    dm.setup("fit")
    assert [s.format for s in dm.mix_stats] == ["text", "text"]


def test_the_alpaca_5000_mix_matches_its_weights(tokenizer) -> None:
    """Done-when 2: the embedded instructions and ../shared/data/alpaca_5000.json at 0.7/0.3."""
    alpaca = shared_alpaca()
    if alpaca is None:
        pytest.skip("../shared/data/alpaca_5000.json is absent beside this checkout")
    dm = InstructionDataModule(sources=[MixSource(EmbeddedWorld(), 0.7), MixSource(str(alpaca), 0.3)],
                               max_seq_length=512)
    dm.connect(tokenizer)
    dm.setup("fit")
    embedded, shared = dm.mix_stats
    total = embedded.mixed_examples + shared.mixed_examples
    print(f"mix: embedded {embedded.mixed_examples / total:.2%}, alpaca_5000 {shared.mixed_examples / total:.2%}")
    assert abs(embedded.mixed_examples / total - 0.7) < SHARE_TOLERANCE
    assert shared.dropped == {"empty response": 2} and shared.records == 4750
