"""Preference record formats: prompts and responses rendered as SFT renders them, HH split on turns, margins,
the empty-prompt rule, and truncation that never cuts a response."""

from __future__ import annotations

import gzip
import json

import pytest

from lit_ft.data.formats import format_alpaca_prompt, tokenize_record
from lit_ft.data.preference_formats import (
    EmptyResponse,
    PreferencePair,
    hh_turns,
    parse_hh,
    split_shared_prompt,
    tokenize_pair,
    truncate_pair,
)
from lit_ft.data.sources import DataError, Location
from tests.tiny_models import ROOT

HH_FILE = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_test.jsonl.gz"


def _ids(tokenizer, text: str) -> list[int]:
    """Whole-string tokenization with special tokens recognised, no automatic BOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
