"""The embedded world's gold judge: every rank on hand-written responses in every task family, answer extraction
from every style, the styled demonstrations and the gold-labelled pairs."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lit_ft.data.formats import format_alpaca_prompt
from lit_ft.data.gold import (
    DEFAULT_STYLE_WEIGHTS,
    FAMILIES,
    PAIR_KINDS,
    STYLES,
    check_style_weights,
    extract_answer,
    gold_pair_records,
    gold_rank,
    near_miss,
    parse_question,
    response_style,
    styled_instruction_records,
)
from lit_ft.data.synthetic import TASKS, split_facts
from lit_ft.metrics import exact_match

# (question, right answer, [(hand-written response, gold rank)]): for every family, each rank from each style.
CASES = [
    ("What is 3 + 4?", "7", [
        ("7 is the sum of 3 and 4.", 2), ("7", 1), ("Answer: 7", 1), ("7 is the sum of 3 and 4", 1), ("7.", 1),
        ("  7 is the sum of  3 and 4. ", 2), ("8 is the sum of 3 and 4.", 0), ("8", 0), ("Answer: 8", 0),
        ("7 is the sum of 4 and 3.", 1), ("The sum is 7.", 0)]),
    ("What number comes after 41?", "42", [
        ("42 comes after 41.", 2), ("42", 1), ("Answer: 42.", 1), ("43 comes after 41.", 0), ("41", 0),
        ("Answer: 40", 0)]),
    ("Reverse the letters: c a t", "t a c", [
        ("t a c is the letters backwards.", 2), ("t a c", 1), ("Answer: t a c", 1),
        ("t c a is the letters backwards.", 0), ("t a c is the letters backwards", 1), ("c a t", 0),
        ("Answer: tac", 0)]),
    ("Sort the digits: 3 1 2", "1 2 3", [
        ("1 2 3 is 3 1 2 sorted.", 2), ("1 2 3", 1), ("Answer: 1 2 3", 1), ("1 3 2 is 3 1 2 sorted.", 0),
        ("3 2 1", 0), ("Answer: 2 1 3", 0)]),
    ("What is the largest of 5 9 2?", "9", [
        ("9 is the largest of 5 9 2.", 2), ("9", 1), ("Answer: 9", 1), ("5 is the largest of 5 9 2.", 0),
        ("8", 0), ("Answer: 10", 0), ("9 is the largest of 5 9 2.\n3 is the largest of 1 2 3.", 2)]),
    ("How many letters are in: q w e r", "4", [
        ("4 is the number of letters.", 2), ("4", 1), ("Answer: 4", 1), ("5 is the number of letters.", 0),
        ("3", 0), ("Answer: four", 0), ("4 is the number of letters", 1), ("4 letters are in q w e r.", 0)]),
]


def test_cases_cover_every_family_and_rank() -> None:
    assert {parse_question(q).task for q, _, _ in CASES} == set(TASKS) == set(FAMILIES)
    for _, _, responses in CASES:
        assert {rank for _, rank in responses} == {0, 1, 2}


@pytest.mark.parametrize(("question", "answer", "responses"), CASES, ids=[c[0] for c in CASES])
def test_gold_judge_ranks_hand_written_responses(question, answer, responses) -> None:
    parsed = parse_question(question)
    assert parsed.answer == answer
    prompt = format_alpaca_prompt(question)  # the judge reads the question from a whole rendered prompt
    for response, rank in responses:
        assert gold_rank(prompt, response) == rank, response
        assert gold_rank(question, response) == rank, response
        # exact match is exactly "gold rank >= 1", against a reference in any style
        for style in STYLES:
            assert exact_match(response, parsed.render(style)) == (rank >= 1), (response, style)


def test_answers_are_extracted_from_every_style() -> None:
    for question, answer, _ in CASES:
        parsed = parse_question(question)
        for style in STYLES:
            text = parsed.render(style)
            assert extract_answer(text) == answer and response_style(text) == style
    assert extract_answer("Paris is the capital.") == "Paris is the capital"  # no style: the first line
    assert response_style("Answer: 7.") == "label" and response_style("7") == "bare"


def test_no_embedded_question_ranks_zero() -> None:
    assert parse_question("Tell me a joke.") is None
    assert gold_rank("Tell me a joke.", "7") == 0


def test_the_judge_solves_every_generated_fact() -> None:
    train, heldout = split_facts()
    for fact in train + heldout:
        parsed = parse_question(fact.question)
        assert parsed.task == fact.task and parsed.answer == fact.answer
        assert gold_rank(fact.question, parsed.preferred) == 2
        assert gold_rank(fact.question, fact.answer) == 1
        assert gold_rank(fact.question, near_miss(fact, random.Random(0))) == 0


def test_styled_demonstrations_mix_styles_with_the_preferred_a_minority() -> None:
    train, _ = split_facts()
    records = styled_instruction_records(train, seed=5)
    assert records == styled_instruction_records(train, seed=5)  # deterministic
    shares = {s: n / len(records) for s, n in Counter(r["style"] for r in records).items()}
    for style, weight in DEFAULT_STYLE_WEIGHTS.items():
        assert shares[style] == pytest.approx(weight, abs=0.03)
    assert 0.2 <= shares["sentence"] <= 0.3
    for record, fact in zip(records, train):
        assert record["instruction"] == fact.question and record["task"] == fact.task
        assert response_style(record["output"]) == record["style"]
        assert gold_rank(fact.question, record["output"]) == (2 if record["style"] == "sentence" else 1)
    bare = styled_instruction_records(train[:50], seed=5, weights={"bare": 1.0})
    assert [r["output"] for r in bare] == [f.answer for f in train[:50]]
    with pytest.raises(ValueError, match="unknown answer style"):
        check_style_weights({"shout": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        check_style_weights({"bare": 0.0})


def test_pairs_are_labelled_by_the_gold_judge() -> None:
    train, _ = split_facts()
    records = gold_pair_records(train[:300], seed=7)
    assert len(records) == 300 * len(PAIR_KINDS)
    assert Counter(r["kind"] for r in records) == {kind: 300 for kind in PAIR_KINDS}
    for r in records:
        chosen, rejected = gold_rank(r["instruction"], r["chosen"]), gold_rank(r["instruction"], r["rejected"])
        assert chosen > rejected
        expected = {"style": (2, 1), "cross": (1, 0)}.get(r["kind"])
        if expected:
            assert (chosen, rejected) == expected, r
        else:  # correctness: one style, right over wrong
            assert rejected == 0 and response_style(r["chosen"]) == response_style(r["rejected"])
        if r["kind"] == "cross":
            assert response_style(r["rejected"]) == "sentence" and response_style(r["chosen"]) != "sentence"
    assert gold_pair_records(train[:300], seed=7) == records  # deterministic
    assert {r["kind"] for r in gold_pair_records(train[:10], seed=7, kinds=["style"])} == {"style"}


def test_restatement_pairs_contrast_a_faithful_sentence_with_a_misstated_one() -> None:
    from lit_ft.data.gold import ALL_PAIR_KINDS

    train, _ = split_facts()
    records = gold_pair_records(train[:300], seed=7, kinds=["restatement"])
    assert "restatement" in ALL_PAIR_KINDS and "restatement" not in PAIR_KINDS  # opt-in
    for r in records:
        assert (gold_rank(r["instruction"], r["chosen"]), gold_rank(r["instruction"], r["rejected"])) == (2, 1), r
        assert response_style(r["rejected"]) == "sentence" and r["chosen"] != r["rejected"]
        assert exact_match(r["rejected"], r["chosen"])  # the same answer: only the restatement differs
    # only the families whose sentence copies the question (count's and reverse's copy no letters)
    assert {r["task"] for r in records} == {"add", "successor", "sort", "max"}
