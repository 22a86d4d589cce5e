"""Preference data: formats (HH split on turns), margins, drops, truncation, batches, embedded pairs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from lit_ft.data.datamodule import ResumableDataLoader, SeededShuffleSampler
from lit_ft.data.formats import format_alpaca_prompt, tokenize_record
from lit_ft.data.gold import PAIR_KINDS, gold_pair_records, gold_rank
from lit_ft.data.preference import (
    EmptyResponse,
    PreferenceCollator,
    PreferenceDataModule,
    PreferencePair,
    build_pairs,
    hh_turns,
    near_miss,
    parse_hh,
    preference_records,
    split_shared_prompt,
    tokenize_pair,
    truncate_pair,
)
from lit_ft.data.sources import DataError, Location
from lit_ft.data.synthetic import split_facts
from tests.tiny_models import ROOT

HH_FILE = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_test.jsonl.gz"


def _ids(tokenizer, text: str) -> list[int]:
    """Whole-string tokenization with special tokens recognised, no automatic BOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------ formats
def test_string_prompt_renders_as_one_builtin_chat_turn(tokenizer) -> None:
    pair = tokenize_pair({"prompt": "What is 2+2?", "chosen": "4", "rejected": "five"}, tokenizer)
    assert pair.prompt_ids + pair.chosen_ids == _ids(tokenizer, "<s>[INST] What is 2+2? [/INST] 4</s>")
    assert pair.prompt_ids + pair.rejected_ids == _ids(tokenizer, "<s>[INST] What is 2+2? [/INST] five</s>")
    assert pair.prompt_ids[0] == tokenizer.bos_token_id and pair.chosen_ids[-1] == tokenizer.eos_token_id
    assert pair.margin == 0.0


def test_chat_message_prompt_and_responses(tokenizer) -> None:
    record = {
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": "Seven.",
    }
    pair = tokenize_pair(record, tokenizer)
    text = "<s>[INST] Hi [/INST] Hello!</s>[INST] Name a colour. [/INST]"
    assert pair.prompt_ids == _ids(tokenizer, text)
    assert pair.prompt_ids + pair.chosen_ids == _ids(tokenizer, text + " Blue.</s>")
    assert pair.prompt_ids + pair.rejected_ids == _ids(tokenizer, text + " Seven.</s>")


def test_implicit_chat_conversations_split_at_the_first_differing_assistant_turn(tokenizer) -> None:
    shared = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
              {"role": "user", "content": "Q2"}]
    record = {"chosen": shared + [{"role": "assistant", "content": "good"}],
              "rejected": shared + [{"role": "assistant", "content": "bad"}]}
    pair = tokenize_pair(record, tokenizer)
    assert pair.prompt_ids == _ids(tokenizer, "<s>[INST] Q1 [/INST] A1</s>[INST] Q2 [/INST]")
    assert pair.chosen_ids == _ids(tokenizer, "<s>[INST] Q1 [/INST] A1</s>[INST] Q2 [/INST] good</s>")[
        len(pair.prompt_ids):]


def test_alpaca_pairs_render_exactly_like_sft(tokenizer) -> None:
    record = {"instruction": "What is 3 + 4?", "input": "", "chosen": "7", "rejected": "8"}
    pair = tokenize_pair(record, tokenizer)
    sft = tokenize_record({"instruction": "What is 3 + 4?", "input": "", "output": "7"}, tokenizer, "alpaca")
    assert pair.prompt_ids + pair.chosen_ids == sft["input_ids"]
    assert tokenizer.decode(pair.prompt_ids, skip_special_tokens=True) == format_alpaca_prompt("What is 3 + 4?")


def test_hh_split_is_on_turn_boundaries_not_characters(tokenizer) -> None:
    prefix = "\n\nHuman: Can you help me?\n\nAssistant: Sure.\n\nHuman: Then help me now."
    record = {"chosen": prefix + "\n\nAssistant: I can help with that.",
              "rejected": prefix + "\n\nAssistant: I can't."}  # the responses share the characters "I can"
    pair = tokenize_pair(record, tokenizer)
    prompt = "<s>[INST] Can you help me? [/INST] Sure.</s>[INST] Then help me now. [/INST]"
    assert pair.prompt_ids == _ids(tokenizer, prompt)
    assert pair.chosen_ids == _ids(tokenizer, prompt + " I can help with that.</s>")[len(pair.prompt_ids):]
    assert pair.rejected_ids == _ids(tokenizer, prompt + " I can't.</s>")[len(pair.prompt_ids):]
    # The same dialogue given as a prompt string in HH form (TRL's preprocessed hh-rlhf) renders identically.
    explicit = tokenize_pair({"prompt": prefix + "\n\nAssistant:", "chosen": " I can help with that.",
                              "rejected": " I can't."}, tokenizer)
    assert explicit == pair


def test_hh_parsing_keeps_text_and_joins_repeated_speakers() -> None:
    text = "\n\nHuman: hi\n\nAssistant: one\n\nAssistant: two\n\nHuman: ok"
    lead, turns = hh_turns(text)
    assert lead + "".join(f"\n\n{s}:{t}" for s, t in turns) == text
    assert parse_hh(text) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one\n\ntwo"},
                              {"role": "user", "content": "ok"}]
    with pytest.raises(DataError, match="field 'chosen': expected an HH transcript"):
        parse_hh("just a plain answer", Location("f.jsonl", 3), "chosen")


def test_shared_prompt_backs_off_to_an_assistant_turn() -> None:
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    # Identical up to the end: the prompt stops before the last assistant turn (then the pair is identical).
    prompt, c, r = split_shared_prompt([u("q"), a("x")], [u("q"), a("x")])
    assert prompt == [u("q")] and c == r == [a("x")]
    # They differ in a user turn: the continuation starts at the shared assistant turn before it.
    prompt, c, r = split_shared_prompt([u("q"), a("x"), u("y"), a("1")], [u("q"), a("x"), u("z"), a("2")])
    assert prompt == [u("q")] and c[0] == r[0] == a("x")
    with pytest.raises(DataError, match="share no prompt"):
        split_shared_prompt([u("q"), a("x")], [u("p"), a("x")], Location("f.jsonl", 9))


@pytest.mark.skipif(not HH_FILE.exists(), reason=f"{HH_FILE} is absent (the real HH-RLHF file lives in ../shared/data)")
def test_hh_prefix_split_on_real_transcripts(tokenizer) -> None:
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(150)]
    empty = 0
    for i, record in enumerate(records):
        chosen, rejected = parse_hh(record["chosen"]), parse_hh(record["rejected"])
        prompt, c, r = split_shared_prompt(chosen, rejected)
        assert prompt[-1]["role"] == "user" and c[0]["role"] == r[0]["role"] == "assistant", i
        if len(c) == len(r) == 1:  # the usual case: only the final assistant turn differs
            # The prompt is the text up to the last shared "\n\nAssistant:" marker; the response is the rest.
            marker = record["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")
            assert record["rejected"][:marker] == record["chosen"][:marker], i
            assert c[0]["content"] == record["chosen"][marker:].strip(), i
            assert r[0]["content"] == record["rejected"][marker:].strip(), i
        try:
            pair = tokenize_pair(record, tokenizer, "hh", location=Location(str(HH_FILE), i + 1))
        except EmptyResponse:  # the real file has a few empty final turns (line 87): dropped and counted
            empty += 1
            assert not c[-1]["content"] or not r[-1]["content"], i
            continue
        assert tokenizer.decode(pair.prompt_ids).endswith("[/INST]")
        assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tokenizer.eos_token_id
    assert empty < 5


def test_margin_column(tokenizer) -> None:
    pair = tokenize_pair({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}, tokenizer)
    assert pair.margin == 2.0
    with pytest.raises(DataError, match=r"f.jsonl:4: field 'margin': expected a number"):
        tokenize_pair({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "high"}, tokenizer,
                      location=Location("f.jsonl", 4))


def test_identical_and_empty_pairs_are_dropped_and_counted(tokenizer, tmp_path: Path, capsys) -> None:
    rows = [{"prompt": f"Say {i}.", "chosen": str(i), "rejected": str(i + 1), "margin": 0.5 * (i % 2)}
            for i in range(10)]
    rows[3]["rejected"] = rows[3]["chosen"]  # identical
    rows[4]["rejected"] = rows[4]["chosen"] + "   "  # identical after formatting (response whitespace)
    rows[5]["chosen"] = ""  # empty
    source = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(source=source, tokenizer=tokenizer, val_split_fraction=0.0, micro_batch_size=2)
    dm.setup("fit")
    stats = dm.stats_train
    assert (stats.records, stats.pairs, stats.identical, stats.empty, stats.too_long) == (10, 7, 2, 1, 0)
    assert stats.with_margin == 3 and dm.train_format == "prompt" and dm.prompt_format == "chat"
    printed = capsys.readouterr().out
    assert "[data] train: 7 pairs from 10 records" in printed and "dropped 2 identical, 1 empty" in printed


def test_bad_record_names_file_line_and_field(tokenizer, tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                   {"prompt": "p", "chosen": "a", "rejected": 3}])
    dm = PreferenceDataModule(source=source, tokenizer=tokenizer, val_split_fraction=0.0)
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'rejected'"):
        dm.setup("fit")
    with pytest.raises(DataError, match="unknown preference format"):
        PreferenceDataModule(source=source, format="pairs")


# --------------------------------------------------------------------------------------------- truncation
def test_truncation_cuts_the_prompt_from_the_left_and_never_a_response() -> None:
    pair = PreferencePair(prompt_ids=[1, 10, 11, 12, 13, 14], chosen_ids=[20, 21, 2], rejected_ids=[30, 2])
    assert truncate_pair(pair, 9) is pair
    cut = truncate_pair(pair, 7)
    assert cut.prompt_ids == [1, 12, 13, 14]  # BOS kept, then the end of the prompt
    assert cut.chosen_ids == [20, 21, 2] and cut.rejected_ids == [30, 2]
    assert max(cut.chosen_length, cut.rejected_length) == 7
    assert truncate_pair(pair, 4).prompt_ids == [1]
    assert truncate_pair(pair, 3) is None  # the longer response does not fit after BOS: dropped


def test_overlong_pairs_in_a_split_are_cut_or_dropped(tokenizer) -> None:
    long_prompt = " ".join(["word"] * 60)
    records = [{"prompt": long_prompt, "chosen": "yes", "rejected": "no"},
               {"prompt": "short", "chosen": "a " * 80, "rejected": "b"}]
    pairs, stats = build_pairs(records, [Location("x", row=i) for i in range(2)], tokenizer, "auto", 32)
    assert (stats.pairs, stats.prompts_cut, stats.too_long) == (1, 1, 1)
    assert max(pairs[0].chosen_length, pairs[0].rejected_length) <= 32
    assert tokenizer.decode(pairs[0].prompt_ids).endswith("word [/INST]")


# ----------------------------------------------------------------------------------------------- batches
def test_collator_stacks_chosen_then_rejected_with_either_padding() -> None:
    items = [{"chosen_input_ids": torch.tensor([1, 5, 6, 2]), "rejected_input_ids": torch.tensor([1, 5, 2]),
              "margin": torch.tensor(0.5)},
             {"chosen_input_ids": torch.tensor([1, 7, 2]), "rejected_input_ids": torch.tensor([1, 7, 8, 9, 2]),
              "margin": torch.tensor(0.0)}]
    right = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=1)(items)
    left = PreferenceCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=1)(items)
    assert right["input_ids"].shape == (4, 5) and right["margin"].tolist() == [0.5, 0.0]
    assert right["input_ids"][0].tolist() == [1, 5, 6, 2, 0] and right["input_ids"][2].tolist() == [1, 5, 2, 0, 0]
    assert left["input_ids"][1].tolist() == [0, 0, 1, 7, 2] and left["input_ids"][3].tolist() == [1, 7, 8, 9, 2]
    assert right["attention_mask"].sum(-1).tolist() == left["attention_mask"].sum(-1).tolist() == [4, 3, 3, 5]
    # Position ids count real tokens, wherever the padding is.
    assert left["position_ids"][1].tolist()[2:] == [0, 1, 2] and right["position_ids"][1].tolist()[:3] == [0, 1, 2]
    with pytest.raises(DataError, match="padding_side"):
        PreferenceCollator(pad_token_id=0, padding_side="middle")


# ------------------------------------------------------------------------------------------ embedded pairs
def test_near_misses_are_plausible_and_wrong() -> None:
    import random

    train, _ = split_facts()
    rng = random.Random(0)
    for fact in train[:300]:
        wrong = near_miss(fact, rng)
        assert wrong != fact.answer
        if fact.task in ("reverse", "sort"):
            assert sorted(wrong.split()) == sorted(fact.answer.split()) or len(wrong) == len(fact.answer)
            assert sum(a != b for a, b in zip(wrong.split(), fact.answer.split())) in (1, 2)
        else:
            assert abs(int(wrong) - int(fact.answer)) == 1


def test_embedded_pairs_use_the_sft_split_and_alpaca_prompt(tokenizer) -> None:
    dm = PreferenceDataModule(tokenizer=tokenizer)
    train, heldout = dm.embedded_records()
    sft_train, sft_heldout = split_facts(1234, 2000, 200)
    kinds = len(PAIR_KINDS)
    assert [r["instruction"] for r in heldout] == [f.question for f in sft_heldout for _ in range(kinds)]
    assert {r["instruction"] for r in train} == {f.question for f in sft_train}
    assert len(train) == kinds * len(sft_train) and len(heldout) == kinds * 200
    assert all(gold_rank(r["instruction"], r["chosen"]) > gold_rank(r["instruction"], r["rejected"]) for r in heldout)
    assert gold_pair_records(sft_heldout, 1242) == heldout  # deterministic from the world seed
    pair = tokenize_pair(heldout[0], tokenizer)
    prompt = tokenizer.decode(pair.prompt_ids, skip_special_tokens=True)
    assert prompt == format_alpaca_prompt(sft_heldout[0].question)
    only = PreferenceDataModule(tokenizer=tokenizer, pair_kinds=["cross"]).embedded_records()[1]
    assert {r["kind"] for r in only} == {"cross"} and len(only) == 200
    with pytest.raises(DataError, match="pair_kinds"):
        PreferenceDataModule(pair_kinds=["style", "length"])


def test_bare_near_miss_pairs() -> None:
    _, heldout = split_facts(1234, 2000, 200)
    records = preference_records(heldout, 1242, rejected_per_fact=2)
    assert all(r["chosen"] == next(f.answer for f in heldout if f.question == r["instruction"]) for r in records)
    assert len(records) > len(heldout) and all(r["chosen"] != r["rejected"] for r in records)


def test_datamodule_batches_resume_and_left_padding(tokenizer) -> None:
    dm = PreferenceDataModule(tokenizer=tokenizer, num_train=40, num_heldout=8, micro_batch_size=4,
                              padding_side="left")
    dm.setup("fit")
    assert (dm.stats_train.pairs, dm.stats_val.pairs) == (120, 24) and dm.prompt_format == "alpaca"
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, SeededShuffleSampler)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8 and batch["margin"].shape == (4,)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with a real token
    assert (batch["input_ids"][:, -1] == tokenizer.eos_token_id).all()
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[0] == 8
