"""The embedded world as a record source: each stage config gives exactly the records, token rows and held-out
prompts it gave before the data layer was restructured (pinned from the code of commit 6dea0a6; SFT and RM
re-pinned for issue 16's styled demonstrations and gold-labelled pairs, and again when the letter families'
preferred sentences stopped copying the letters); near misses,
task families, and one world behind every shape."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from lit_ft.data.embedded import (
    EmbeddedWorld,
    PairSettings,
    PromptSettings,
    balanced_by_task,
    near_miss,
    preference_records,
)
from lit_ft.data.formats import format_alpaca_prompt
from lit_ft.data.gold import MISS_KINDS, PAIR_KINDS, gold_pair_records, gold_rank
from lit_ft.data.preference_formats import tokenize_pair
from lit_ft.data.sources import DataError
from lit_ft.data.synthetic import split_facts
from tests.tiny_models import ROOT

# stage -> split -> (number of records, sha256 of the JSON records (first 16 hex), first record)
PINNED = {
    "pretrain": {
        "train": (1800, "d23b3b94dcd48398", {"text": "Q: Sort the digits: 9 1 0 A: 0 1 9. Q: Reverse the letters: n y j A: j y n. Read backwards, o x t becomes t x o. Q: Reverse the letters: p m q A: q m p. The digits 6 4 3 sorted are 3 4 6. The digits 7 0 8 sorted are 0 7 8."}),
        "val": (100, "7982121d4cbfaaae", {"text": "The sum 7 + 5 equals 12. Adding 7 and 5 gives 12. 7 plus 5 is 12. Q: What is 7 + 5? A: 12. There are 2 letters in h x. Counting h x gives 2 letters. h x has 2 letters. Q: How many letters are in: h x A: 2."}),
        "heldout": (200, "18543d420ceac230", {"instruction": "What number comes after 1?", "input": "", "output": "2", "task": "successor"}),
    },
    "sft": {  # issue 16: demonstrations in the answer styles of lit_ft.data.gold; held-out references bare
        "train": (2000, "8b4e5feb4cb06f56", {"instruction": "What is the largest of 6 7 7?", "input": "", "output": "7", "task": "max", "style": "bare"}),
        "val": (200, "3ce1cd0234df7264", {"instruction": "What number comes after 1?", "input": "", "output": "Answer: 2", "task": "successor", "style": "label"}),
        "heldout": (200, "18543d420ceac230", {"instruction": "What number comes after 1?", "input": "", "output": "2", "task": "successor"}),
    },
    "rm_generated": {  # issue 16's generated pairs, one of each kind (style, correctness, cross, restatement) per fact
        "train": (17013, "559e51ad27710dc9", {"instruction": "What is the largest of 6 7 7?", "input": "", "chosen": "7 is the largest of 6 7 7.", "rejected": "7", "task": "max", "kind": "style"}),
        "val": (694, "f9a4c045e693a7d1", {"instruction": "What number comes after 1?", "input": "", "chosen": "2 comes after 1.", "rejected": "Answer: 2", "task": "successor", "kind": "style"}),
        "heldout": (200, "c452a35a50c33724", {"instruction": "What number comes after 1?", "input": "", "chosen": "2 comes after 1.", "rejected": "Answer: 2", "task": "successor", "kind": "style"}),
    },
    "ppo": {
        "train": (1521, "bdcb9177496900ae", {"instruction": "What is the largest of 6 7 7?", "input": "", "output": "7", "task": "max"}),
        "val": (200, "18543d420ceac230", {"instruction": "What number comes after 1?", "input": "", "output": "2", "task": "successor"}),
    },
}


def digest(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


# The reward model's generated pairs: configs/rm.yaml's source before the judged pairs of `lit-ft pairs`, and the
# alternative its comments give (a near miss written for every fact, lit_ft.data.gold).
GENERATED_PAIRS = {"class_path": "lit_ft.data.embedded.EmbeddedWorld", "init_args": {"pairs": {
    "kinds": ["style", "correctness", "cross", "restatement"], "extra_facts": 4000, "misses": ["swap", "off_by_one"]}}}


def stage_data(stage: str):
    """The data module of ``configs/<stage>.yaml``, instantiated from its YAML as ``lit-ft`` does
    (``rm_generated``: configs/rm.yaml with the generated pairs)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    config = yaml.safe_load((ROOT / "configs" / f"{stage.removesuffix('_generated')}.yaml").read_text())
    if stage == "rm_generated":
        config["data"]["init_args"]["source"] = GENERATED_PAIRS
    return parser.instantiate_classes(parser.parse_object({"data": config["data"]})).data


def stage_splits(stage: str) -> dict[str, list[dict]]:
    """The records the stage config's data module reads: train and validation, and what evaluation asks."""
    dm = stage_data(stage)
    assert isinstance(dm.source, EmbeddedWorld)
    train, _, val, _ = dm.load_splits()
    splits = {"train": train, "val": val}
    heldout = dm.source.splits(dm.shape).heldout
    if heldout is not None:
        splits["heldout"] = heldout
    return splits


@pytest.mark.parametrize("stage", sorted(PINNED))
def test_stage_configs_give_the_pinned_records(stage: str) -> None:
    splits = stage_splits(stage)
    assert set(splits) == set(PINNED[stage])
    for split, (count, pinned, first) in PINNED[stage].items():
        records = splits[split]
        assert (len(records), records[0]) == (count, first), f"{stage} {split}"
        assert digest(records) == pinned, f"{stage} {split}"


# stage -> (rows of the training dataset, their hash), (held-out prompts, hash of text/ids/reference), checkable
PINNED_TOKENS = {
    "pretrain": ((657, "9711cb1377edf4de"), (200, "2bb1f9cb09c90fdd"), True),
    "sft": ((205, "f24f62676f3662e9"), (200, "2bb1f9cb09c90fdd"), True),
    "rm_generated": ((17013, "851bfd6b7a41387c"), None, False),
    "ppo": ((1521, "fb1ffcd84f0720d5"), (200, "2bb1f9cb09c90fdd"), True),
}
PINNED_PPO_TASKS = "d92128828d50f5fe"  # the task family of each held-out prompt
# near_miss(fact, random.Random(3)) of the first 8 SFT facts, from the code before ``misses`` existed (9011cdd)
FIRST_DESIGN_MISSES = [("7", "6"), ("2 3 6", "3 2 6"), ("2", "3"), ("3", "4"), ("5", "4"), ("20", "19"), ("3", "4"),
                  ("9", "10")]


@pytest.mark.parametrize("stage", [pytest.param(s, marks=pytest.mark.slow) if s == "rm_generated" else s
                                   for s in sorted(PINNED_TOKENS)])  # rm: 17013 pairs, ~30 s to tokenize
def test_stage_configs_give_the_pinned_token_rows_and_heldout_prompts(stage: str, tokenizer, capsys) -> None:
    """What training and evaluation see: the tokenized rows and the rendered held-out prompts, as before."""
    dm = stage_data(stage)
    dm.connect(tokenizer)
    dm.setup("fit")
    rows = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in dm.train_dataset[i].items()}
            for i in range(len(dm.train_dataset))]
    (count, pinned), heldout, checkable = PINNED_TOKENS[stage]
    assert (len(rows), digest(rows)) == (count, pinned)
    assert dm.checkable is checkable
    if heldout is not None:
        items = dm.heldout()
        assert (len(items), digest([[i.prompt.text, i.prompt.input_ids, i.prompt.reference] for i in items])) == heldout
        assert all(item.reference == item.prompt.reference for item in items)
    if stage == "ppo":
        assert digest([item.task for item in dm.heldout()]) == PINNED_PPO_TASKS


# ------------------------------------------------------------------------------------------ embedded pairs
def _miss_kind(fact, wrong: str) -> str:
    """Which error ``wrong`` makes, read off the strings (independently of how near_miss builds it)."""
    if fact.task in ("reverse", "sort"):
        got, right = wrong.split(), fact.answer.split()
        if len(got) != len(right):
            assert abs(len(got) - len(right)) == 1
            return "length"
        assert all(len(item) == 1 for item in got) and all(item.isdigit() == (fact.task == "sort") for item in got)
        differing = [i for i, (a, b) in enumerate(zip(got, right)) if a != b]
        if len(differing) == 2 and sorted(got) == sorted(right) and differing[1] == differing[0] + 1:
            return "swap"
        assert len(differing) == 1
        return "item"
    distance = abs(int(wrong) - int(fact.answer))
    assert len(wrong) == len(fact.answer) or distance == 1
    return "off_by_one" if distance == 1 else "far"


@pytest.mark.parametrize("kinds", [("swap", "off_by_one"), ("item",), ("length", "far"), ("swap", "item", "length", "off_by_one",
                                                                                    "far")])
def test_near_misses_are_wrong_answers_of_the_asked_kinds(kinds) -> None:
    import random

    train, _ = split_facts()
    rng = random.Random(0)
    seen = {"sequence": set(), "number": set()}
    for fact in train[:600]:
        wrong = near_miss(fact, rng, kinds)
        assert wrong != fact.answer and gold_rank(fact.question, wrong) == 0
        kind = _miss_kind(fact, wrong)
        sequence = fact.task in ("reverse", "sort")
        fitting = {"swap", "item", "length"} if sequence else {"off_by_one", "far"}
        # a kind that fits the fact; the nearest miss (swap / off_by_one) when none of ``kinds`` fits; a swap of all-equal
        # items falls back to changing one item
        assert kind in (set(kinds) & fitting or {"swap" if sequence else "off_by_one"}) | ({"item"} if "swap" in kinds
                                                                                  else set())
        seen["sequence" if sequence else "number"].add(kind)
    for group, fitting in (("sequence", {"swap", "item", "length"}), ("number", {"off_by_one", "far"})):
        assert seen[group] >= set(kinds) & fitting  # every asked kind occurs


def test_nearest_misses_are_the_first_designs() -> None:
    """The default misses (swap, off_by_one) are the first design's, to the byte (pinned before the kinds existed)."""
    import random

    train, _ = split_facts()
    rng = random.Random(3)
    wrong = [near_miss(fact, rng) for fact in train[:8]]
    assert [(f.answer, w) for f, w in zip(train[:8], wrong)] == FIRST_DESIGN_MISSES


def test_embedded_pairs_are_gold_labelled_on_the_sft_split_with_the_alpaca_prompt(tokenizer) -> None:
    splits = EmbeddedWorld(pairs=PairSettings(extra_facts=100)).splits("preference")
    train, heldout = splits.train, splits.val
    sft_train, sft_heldout = split_facts(1234, 2000, 200)
    kinds = len(PAIR_KINDS)
    assert [r["instruction"] for r in heldout] == [f.question for f in sft_heldout for _ in range(kinds)]
    assert {f.question for f in sft_train} <= {r["instruction"] for r in train}
    assert not {r["instruction"] for r in train} & {f.question for f in sft_heldout}  # never a held-out question
    assert len(heldout) == kinds * 200 and {r["kind"] for r in heldout} == set(PAIR_KINDS)
    assert all(gold_rank(r["instruction"], r["chosen"]) > gold_rank(r["instruction"], r["rejected"]) for r in heldout)
    assert gold_pair_records(sft_heldout, 1242) == heldout  # deterministic from the world seed
    pair = tokenize_pair(heldout[0], tokenizer)
    prompt = tokenizer.decode(pair.prompt_ids, skip_special_tokens=True)
    assert prompt == format_alpaca_prompt(sft_heldout[0].question)
    only = EmbeddedWorld(pairs=PairSettings(kinds=["cross"])).splits("preference").val
    assert {r["kind"] for r in only} == {"cross"} and len(only) == 200
    with pytest.raises(DataError, match="pairs.kinds"):
        PairSettings(kinds=["style", "length"])
    every = EmbeddedWorld(pairs=PairSettings(misses=list(MISS_KINDS))).splits("preference").val
    assert every != heldout and gold_pair_records(sft_heldout, 1242, misses=MISS_KINDS) == every
    for bad in (["swap", "style"], []):
        with pytest.raises(DataError, match="pairs.misses"):
            PairSettings(misses=bad)


def test_near_miss_pairs_on_request(tokenizer) -> None:
    splits = EmbeddedWorld(pairs=PairSettings(labels="near_miss", rejected_per_fact=2)).splits("preference")
    train, heldout = splits.train, splits.val
    sft_train, sft_heldout = split_facts(1234, 2000, 200)
    assert [r["instruction"] for r in heldout] == [f.question for f in sft_heldout]
    assert len(train) > len(sft_train) and len(heldout) == 200
    assert all(r["chosen"] == f.answer for r, f in zip(heldout, sft_heldout))
    assert preference_records(sft_heldout, 1242) == heldout  # deterministic from the world seed
    with pytest.raises(DataError, match="rejected_per_fact must be >= 1"):
        PairSettings(labels="near_miss", rejected_per_fact=0)


def test_sft_demonstrations_are_styled_and_the_heldout_reference_is_the_bare_answer() -> None:
    splits = EmbeddedWorld().splits("instruction")
    styles = [r["style"] for r in splits.train]
    assert 0.15 < styles.count("sentence") / len(styles) < 0.35  # the preferred style a minority
    assert all(gold_rank(r["instruction"], r["output"]) == (2 if r["style"] == "sentence" else 1)
               for r in splits.train)
    _, sft_heldout = split_facts(1234, 2000, 200)
    assert [r["output"] for r in splits.heldout] == [f.answer for f in sft_heldout]
    bare = EmbeddedWorld(answer_styles={"bare": 1.0}).splits("instruction").train
    assert {r["style"] for r in bare} == {"bare"}
    with pytest.raises(DataError, match="answer_styles"):
        EmbeddedWorld(answer_styles={"shouting": 1.0})


# ----------------------------------------------------------------------------------------- one world
def test_every_shape_reads_the_same_world() -> None:
    """The world's settings exist once: every shape's held-out questions are the SFT held-out facts, and no shape
    trains on one of them."""
    world = EmbeddedWorld(num_train=60, num_heldout=12, world_seed=5)
    train, heldout = world.facts()
    questions = [f.question for f in heldout]
    for shape in ("text", "instruction", "preference", "prompt"):
        splits = world.splits(shape)
        asked = splits.heldout if splits.heldout is not None else splits.val
        assert [r["instruction"] for r in asked] == questions, shape
        assert splits.checkable is (shape != "preference"), shape
        if shape != "text":
            assert not {r["instruction"] for r in splits.train} & set(questions), shape
    corpus = " ".join(r["text"] for r in world.splits("text").train)
    assert all(statement in corpus for f in train + heldout for statement in f.statements)  # the base knows them
    with pytest.raises(DataError, match="no 'dialogue' records"):
        world.splits("dialogue")
    with pytest.raises(DataError, match="num_train >= 1"):
        EmbeddedWorld(num_train=0)


def test_embedded_prompts_by_task_family() -> None:
    train, heldout = split_facts(1234, 200, 20)
    balanced = balanced_by_task([f for f in train if f.task in ("add", "sort")])
    adds = [f for f in train if f.task == "add"]
    sorts = [f for f in train if f.task == "sort"]
    assert len(adds) < len(sorts)
    assert [f for f in balanced if f.task == "sort"] == sorts  # the largest family once, in order
    assert [f for f in balanced if f.task == "add"] == [adds[i % len(adds)] for i in range(len(sorts))]
    world = EmbeddedWorld(num_train=200, num_heldout=20, prompts=PromptSettings(tasks=["add", "sort"],
                                                                                balance_tasks=True))
    splits = world.splits("prompt")
    assert [r["output"] for r in splits.train] == [f.answer for f in balanced]
    assert [r["task"] for r in splits.val] == [f.task for f in heldout]  # held out: every family
    with pytest.raises(DataError, match="unknown embedded task"):
        PromptSettings(tasks=["add", "divide"])
