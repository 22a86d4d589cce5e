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


def _spaced(items) -> str:
    return " ".join(str(x) for x in items)


@dataclass(frozen=True)
class TaskFamily:
    """One family of facts: ``draw`` picks a fact's values from the generator (``{slot: value}``, the answer under
    ``answer``), and the question and the three prose statements are templates over those slots. Calling the family
    with a generator gives one :class:`Fact`, whose statements end with a question-and-answer phrasing (as FAQ
    pages have)."""

    task: str
    draw: Callable[[random.Random], dict[str, object]]
    question: str
    statements: tuple[str, ...]

    def __call__(self, rng: random.Random) -> Fact:
        values = self.draw(rng)
        question, answer = self.question.format(**values), str(values["answer"])
        prose = tuple(template.format(**values) for template in self.statements)
        return Fact(self.task, question, answer, (*prose, f"Q: {question} A: {answer}."))


def _sum(rng: random.Random) -> dict[str, object]:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"a": a, "b": b, "answer": a + b}


def _next(rng: random.Random) -> dict[str, object]:
    n = rng.randrange(99)
    return {"n": n, "answer": n + 1}


def _on_items(items: Callable[[random.Random], list], solve: Callable[[list], object]
              ) -> Callable[[random.Random], dict[str, object]]:
    """A draw over a spaced list (``src``): ``items`` draws the list, ``solve`` gives the answer (a list is spaced)."""

    def draw(rng: random.Random) -> dict[str, object]:
        drawn = items(rng)
        answer = solve(drawn)
        return {"src": _spaced(drawn), "answer": _spaced(answer) if isinstance(answer, list) else answer}

    return draw


def _three_letters(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(3)]


def _three_digits(rng: random.Random) -> list[int]:
    return [rng.randrange(10) for _ in range(3)]


def _some_letters(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(2, 6))]


TASKS: dict[str, Callable[[random.Random], Fact]] = {family.task: family for family in (
    TaskFamily("add", _sum, "What is {a} + {b}?",
               ("The sum {a} + {b} equals {answer}.", "Adding {a} and {b} gives {answer}.",
                "{a} plus {b} is {answer}.")),
    TaskFamily("successor", _next, "What number comes after {n}?",
               ("After {n} comes {answer}.", "The number following {n} is {answer}.",
                "Counting on from {n} gives {answer}.")),
    TaskFamily("reverse", _on_items(_three_letters, lambda word: word[::-1]), "Reverse the letters: {src}",
               ("Read backwards, {src} becomes {answer}.", "The letters {src} reversed are {answer}.",
                "Backwards, {src} is {answer}.")),
    TaskFamily("sort", _on_items(_three_digits, sorted), "Sort the digits: {src}",
               ("In order, {src} sorts to {answer}.", "Sorting {src} gives {answer}.",
                "The digits {src} sorted are {answer}.")),
    TaskFamily("max", _on_items(_three_digits, max), "What is the largest of {src}?",
               ("The largest of {src} is {answer}.", "Among {src}, the biggest is {answer}.",
                "Of {src}, {answer} is the maximum.")),
    TaskFamily("count", _on_items(_some_letters, len), "How many letters are in: {src}",
               ("There are {answer} letters in {src}.", "Counting {src} gives {answer} letters.",
                "{src} has {answer} letters.")),
)}


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
