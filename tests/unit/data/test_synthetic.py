"""The embedded world's fact generator: each task family is a draw and templates, and a seed gives the same facts."""

from __future__ import annotations

import random

from lit_ft.data.synthetic import TASKS, Fact, TaskFamily, generate_facts


def test_the_first_facts_of_the_default_world_seed_by_hand() -> None:
    # Pinned: the embedded world (and every measurement made on it) is a pure function of its seed.
    assert generate_facts(6, 1234) == [
        Fact("add", "What is 7 + 1?", "8",
             ("The sum 7 + 1 equals 8.", "Adding 7 and 1 gives 8.", "7 plus 1 is 8.", "Q: What is 7 + 1? A: 8.")),
        Fact("count", "How many letters are in: c z", "2",
             ("There are 2 letters in c z.", "Counting c z gives 2 letters.", "c z has 2 letters.",
              "Q: How many letters are in: c z A: 2.")),
        Fact("max", "What is the largest of 9 0 1?", "9",
             ("The largest of 9 0 1 is 9.", "Among 9 0 1, the biggest is 9.", "Of 9 0 1, 9 is the maximum.",
              "Q: What is the largest of 9 0 1? A: 9.")),
        Fact("reverse", "Reverse the letters: d y l", "l y d",
             ("Read backwards, d y l becomes l y d.", "The letters d y l reversed are l y d.",
              "Backwards, d y l is l y d.", "Q: Reverse the letters: d y l A: l y d.")),
        Fact("sort", "Sort the digits: 3 0 0", "0 0 3",
             ("In order, 3 0 0 sorts to 0 0 3.", "Sorting 3 0 0 gives 0 0 3.", "The digits 3 0 0 sorted are 0 0 3.",
              "Q: Sort the digits: 3 0 0 A: 0 0 3.")),
        Fact("successor", "What number comes after 2?", "3",
             ("After 2 comes 3.", "The number following 2 is 3.", "Counting on from 2 gives 3.",
              "Q: What number comes after 2? A: 3.")),
    ]


def test_a_family_fills_its_templates_from_its_draw() -> None:
    double = TaskFamily("double", lambda rng: {"n": rng.randrange(5), "answer": "twice"}, "Double {n}?",
                        ("{n} doubled is {answer}.",))
    fact = double(random.Random(0))
    n = random.Random(0).randrange(5)
    assert fact == Fact("double", f"Double {n}?", "twice", (f"{n} doubled is twice.", f"Q: Double {n}? A: twice."))


def test_every_family_answers_its_own_question() -> None:
    rng = random.Random(3)
    for name, family in TASKS.items():
        fact = family(rng)
        assert fact.task == name and len(fact.statements) == 4
        assert all(fact.answer in statement for statement in fact.statements)
