"""The embedded world: instruction tasks and a pre-training corpus that the project generates itself.

Every answer can be checked exactly, so learning is visible on a CPU in minutes. The design mirrors the real
pipeline in miniature:

* the *pre-training corpus* states facts and worked transformations in several plain-prose phrasings
  ("The sum 3 + 4 equals 7.", "Read backwards, c a t becomes t a c."). A base model trained on it knows the
  facts but has never seen an instruction template, so asked with one it rambles (exact match ~0);
* the *instruction set* asks for the same kind of facts through the Alpaca template. SFT teaches the format; the
  held-out split asks questions whose instruction/answer pairs were never seen during SFT.

Everything is a pure function of a seed.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Fact:
    """One checkable item of the embedded world."""

    task: str
    question: str  # the instruction an SFT example asks
    answer: str  # the exact expected response
    statements: tuple[str, ...]  # prose phrasings for the pre-training corpus


def _fact(task: str, question: str, answer: str, *statements: str) -> Fact:
    """A fact with its prose statements plus a question-and-answer phrasing (as FAQ pages have)."""
    return Fact(task, question, answer, (*statements, f"Q: {question} A: {answer}."))


def _spaced(items) -> str:
    return " ".join(str(x) for x in items)


def _add(rng: random.Random) -> Fact:
    a, b = rng.randrange(10), rng.randrange(10)
    s = a + b
    return _fact(
        "add",
        f"What is {a} + {b}?",
        str(s),
        f"The sum {a} + {b} equals {s}.", f"Adding {a} and {b} gives {s}.", f"{a} plus {b} is {s}.",
    )


def _successor(rng: random.Random) -> Fact:
    n = rng.randrange(99)
    return _fact(
        "successor",
        f"What number comes after {n}?",
        str(n + 1),
        f"After {n} comes {n + 1}.", f"The number following {n} is {n + 1}.", f"Counting on from {n} gives {n + 1}.",
    )


def _reverse(rng: random.Random) -> Fact:
    word = [rng.choice(LETTERS) for _ in range(3)]
    src, dst = _spaced(word), _spaced(reversed(word))
    return _fact(
        "reverse",
        f"Reverse the letters: {src}",
        dst,
        f"Read backwards, {src} becomes {dst}.", f"The letters {src} reversed are {dst}.", f"Backwards, {src} is {dst}.",
    )


def _sort(rng: random.Random) -> Fact:
    digits = [rng.randrange(10) for _ in range(3)]
    src, dst = _spaced(digits), _spaced(sorted(digits))
    return _fact(
        "sort",
        f"Sort the digits: {src}",
        dst,
        f"In order, {src} sorts to {dst}.", f"Sorting {src} gives {dst}.", f"The digits {src} sorted are {dst}.",
    )


def _maximum(rng: random.Random) -> Fact:
    digits = [rng.randrange(10) for _ in range(3)]
    src, m = _spaced(digits), max(digits)
    return _fact(
        "max",
        f"What is the largest of {src}?",
        str(m),
        f"The largest of {src} is {m}.", f"Among {src}, the biggest is {m}.", f"Of {src}, {m} is the maximum.",
    )


def _count(rng: random.Random) -> Fact:
    word = [rng.choice(LETTERS) for _ in range(rng.randint(2, 6))]
    src, n = _spaced(word), len(word)
    return _fact(
        "count",
        f"How many letters are in: {src}",
        str(n),
        f"There are {n} letters in {src}.", f"Counting {src} gives {n} letters.", f"{src} has {n} letters.",
    )


TASKS: dict[str, Callable[[random.Random], Fact]] = {
    "add": _add,
    "successor": _successor,
    "reverse": _reverse,
    "sort": _sort,
    "max": _maximum,
    "count": _count,
}


def generate_facts(n: int, seed: int) -> list[Fact]:
    """`n` distinct facts, cycling through the task families, deterministic from `seed`."""
    rng = random.Random(seed)
    names = sorted(TASKS)
    seen: set[str] = set()
    facts: list[Fact] = []
    attempts = 0
    while len(facts) < n and attempts < 50 * n:
        fact = TASKS[names[attempts % len(names)]](rng)
        attempts += 1
        if fact.question not in seen:
            seen.add(fact.question)
            facts.append(fact)
    return facts


def split_facts(seed: int = 1234, n_train: int = 2000, n_heldout: int = 200) -> tuple[list[Fact], list[Fact]]:
    """Disjoint SFT-train and held-out facts (no question appears in both)."""
    facts = generate_facts(n_train + n_heldout, seed)
    rng = random.Random(seed + 1)
    rng.shuffle(facts)
    return facts[n_heldout:], facts[:n_heldout]


def instruction_records(facts: list[Fact]) -> list[dict]:
    """Alpaca-format records (`instruction`, `input`, `output`) plus the task name for per-task metrics."""
    return [{"instruction": f.question, "input": "", "output": f.answer, "task": f.task} for f in facts]


def corpus_records(facts: list[Fact], seed: int, extra: int = 4000, sentences_per_doc: int = 6) -> list[dict]:
    """Raw-text pre-training documents (`text`), each a few prose statements joined by spaces.

    Every given fact appears in all its phrasings; `extra` fresh random facts teach the general skills
    (reversing, sorting, counting) beyond the memorised ones.
    """
    rng = random.Random(seed + 2)
    statements = [s for f in facts for s in f.statements]
    statements += [rng.choice(f.statements) for f in generate_facts(extra, seed + 3)]
    rng.shuffle(statements)
    return [
        {"text": " ".join(statements[i : i + sentences_per_doc])}
        for i in range(0, len(statements), sentences_per_doc)
    ]
