"""The embedded world's hidden gold judge, the answer styles it judges, and the records built from it.

RLHF should move a model that can already answer toward the answers people *prefer* (Gao et al. 2022, "Scaling
Laws for Reward Model Overoptimization": a hidden gold preference that the proxy reward model only sees through
comparisons). In the embedded world the preference is a style:

* ``sentence`` (preferred): a full sentence that gives the answer, restates the question and ends with a period
  ("7 is the sum of 3 and 4.", "1 2 3 is 3 1 2 sorted.");
* ``bare``: the answer alone ("7");
* ``label``: the answer after a label ("Answer: 7").

The sentence starts with the answer, as the bare answer does: the model answers in the same context whichever of
the two it writes, and the style is chosen after the answer (stop, or go on to restate the question). So the
skill SFT teaches is shared by the two, and moving to the preferred style need not change the answer. (A first
design put the answer at the end of the sentence, "3 plus 4 is 7."; with a third of the demonstrations per
style, SFT learned each family's answer separately per style and held-out exact match fell to 51%.)

The gold judge (:func:`gold_rank`) ranks a response to a prompt: 2 for a correct answer in the preferred style, 1
for a correct answer in another style, 0 for a wrong answer. It solves the question itself (it parses the
instruction), so it needs no reference. Correctness is read from every style by :func:`extract_answer`, which
exact match (:func:`lit_ft.metrics.exact_match`) uses too: exact match is exactly "gold rank >= 1".

SFT demonstrations mix the styles (:func:`styled_instruction_records`), the preferred one a minority, so the SFT
policy can sample it but rarely answers in it greedily. Reward-model pairs are labelled by the judge
(:func:`gold_pair_records`). Everything is a pure function of its arguments and a seed.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from lit_ft.data.synthetic import Fact

Style = Literal["sentence", "bare", "label"]
STYLES: tuple[Style, ...] = ("sentence", "bare", "label")
PREFERRED_STYLE: Style = "sentence"
# 25% preferred: a minority the SFT policy samples (about 1 in 5 at temperature 0.7) but that loses the greedy
# choice after the answer to stopping (the bare answer, 60%); "label" (15%) is a second non-preferred style, kept
# small because its answers follow another context ("Answer:") that SFT must learn separately.
DEFAULT_STYLE_WEIGHTS: dict[str, float] = {"bare": 0.60, "label": 0.15, "sentence": 0.25}
PairKind = Literal["style", "correctness", "cross", "restatement"]
# style: preferred-correct over other-correct (rank 2 > 1); correctness: correct over wrong in one style
# (>= 1 > 0); cross: other-correct over preferred-wrong (1 > 0), so that the style never outweighs correctness.
PAIR_KINDS: tuple[PairKind, ...] = ("style", "correctness", "cross")
# restatement (opt-in, not yet measured): the preferred sentence over the same sentence restating the question
# wrongly (2 > 1). Seed 42's PPO (docs/rlhf.md) learned the sentence's shape with a wrong restatement, which no
# default pair contrasts.
ALL_PAIR_KINDS: tuple[PairKind, ...] = (*PAIR_KINDS, "restatement")

_NUMBER, _DIGITS, _LETTERS = r"\d+", r"\d(?: \d)*", r"[a-z](?: [a-z])*"
_LABEL = re.compile(r"Answer:\s*(?P<answer>.+?)\.?")
_SLOT = re.compile(r"\{(\w+)\}")  # a {field} slot of a Family's question or sentence template


@dataclass(frozen=True)
class Family:
    """One task family: how its instruction reads, its preferred sentence, and how to solve it.

    ``question`` and ``sentence`` hold ``{field}`` slots (``sentence`` also ``{answer}``); ``fields`` gives each
    slot's pattern; ``solve`` computes the answer from the fields' text.
    """

    task: str
    question: str
    sentence: str
    fields: Mapping[str, str]
    solve: Callable[[dict[str, str]], str]

    def _pattern(self, template: str, answer: bool) -> str:
        out, pos = [], 0
        for slot in _SLOT.finditer(template):
            out.append(re.escape(template[pos:slot.start()]))
            name = slot.group(1)
            out.append(r"(?P<answer>.+?)" if name == "answer" and answer else f"(?P<{name}>{self.fields[name]})")
            pos = slot.end()
        out.append(re.escape(template[pos:]))
        return "".join(out)

    @property
    def restates_slots(self) -> bool:
        """Whether the preferred sentence copies any of the question's slots (so that it can restate it wrongly)."""
        return bool(set(_SLOT.findall(self.sentence)) - {"answer"})

    @property
    def question_regex(self) -> re.Pattern[str]:
        return re.compile(self._pattern(self.question, answer=False) + "$", re.MULTILINE)

    @property
    def sentence_regex(self) -> re.Pattern[str]:
        """Any sentence of this family's shape (the final period optional); ``answer`` is the claimed answer."""
        pattern = self._pattern(self.sentence, answer=True)
        return re.compile(pattern[:-2] + r"\.?" if pattern.endswith(r"\.") else pattern)


def _spaced(items) -> str:
    return " ".join(str(x) for x in items)


# The letter families' sentences restate the question without copying its letters: the embedded base cannot copy
# a list of letters (seed 42's SFT policy, sampled 8 times at temperature 0.7 on the held-out prompts, restated
# 0 of its ~70 count sentences "N letters are in q w e r." with the right letters, against 73% of its max
# sentences with the right digits: docs/rlhf.md), so a letter-copying sentence would be a preference no policy
# of this base can reach.
FAMILIES: dict[str, Family] = {f.task: f for f in (
    Family("add", "What is {a} + {b}?", "{answer} is the sum of {a} and {b}.", {"a": _NUMBER, "b": _NUMBER},
           lambda v: str(int(v["a"]) + int(v["b"]))),
    Family("successor", "What number comes after {n}?", "{answer} comes after {n}.", {"n": _NUMBER},
           lambda v: str(int(v["n"]) + 1)),
    Family("reverse", "Reverse the letters: {src}", "{answer} is the letters backwards.", {"src": _LETTERS},
           lambda v: _spaced(reversed(v["src"].split()))),
    Family("sort", "Sort the digits: {src}", "{answer} is {src} sorted.", {"src": _DIGITS},
           lambda v: _spaced(sorted(v["src"].split()))),
    Family("max", "What is the largest of {src}?", "{answer} is the largest of {src}.", {"src": _DIGITS},
           lambda v: str(max(int(x) for x in v["src"].split()))),
    Family("count", "How many letters are in: {src}", "{answer} is the number of letters.", {"src": _LETTERS},
           lambda v: str(len(v["src"].split()))),
)}
_QUESTIONS = [(f, f.question_regex) for f in FAMILIES.values()]
_SENTENCES = [f.sentence_regex for f in FAMILIES.values()]


@dataclass(frozen=True)
class Question:
    """A parsed embedded question: its family, the values in its slots, and the right answer."""

    task: str
    values: tuple[tuple[str, str], ...]
    answer: str

    def render(self, style: str, answer: str | None = None) -> str:
        """``answer`` (default: the right one) in ``style``."""
        answer = self.answer if answer is None else answer
        if style == "sentence":
            return FAMILIES[self.task].sentence.format(**dict(self.values), answer=answer)
        if style == "bare":
            return answer
        if style == "label":
            return f"Answer: {answer}"
        raise ValueError(f"unknown answer style {style!r} (expected one of {', '.join(STYLES)})")

    @property
    def preferred(self) -> str:
        return self.render(PREFERRED_STYLE)


def parse_question(text: str) -> Question | None:
    """The embedded question in ``text`` (an instruction, or a whole rendered prompt), None when there is none."""
    for family, regex in _QUESTIONS:
        found = regex.search(text)
        if found:
            values = found.groupdict()
            return Question(family.task, tuple(values.items()), family.solve(values))
    return None


def _first_line(text: str) -> str:
    """The answer line: the first line, whitespace collapsed (what exact match has always compared)."""
    return " ".join(text.strip().split("\n", 1)[0].split())


def extract_answer(response: str) -> str:
    """The answer a response gives, in any style: the slot of a sentence, the text after ``Answer:``, or the
    whole first line; a final period is dropped."""
    line = _first_line(response)
    for regex in (_LABEL, *_SENTENCES):
        found = regex.fullmatch(line)
        if found:
            return found.group("answer").strip()
    return line[:-1].strip() if line.endswith(".") else line


def response_style(response: str) -> Style:
    """The style a response is written in (a sentence of any family's shape counts as ``sentence``)."""
    line = _first_line(response)
    if _LABEL.fullmatch(line):
        return "label"
    if any(regex.fullmatch(line) for regex in _SENTENCES):
        return "sentence"
    return "bare"


@dataclass(frozen=True)
class GoldJudge:
    """The gold judge as the held-out evaluation asks for it (``data.source.gold_judge``): ``rank`` and its top."""

    top: int = 2  # correct and in the preferred style: the share of answers ranked top is the gold win-rate

    def rank(self, prompt: str, response: str) -> int:
        return gold_rank(prompt, response)


def gold_rank(prompt: str, response: str) -> int:
    """The hidden gold judge: 2 = correct and in the preferred style (the question's own sentence, with its
    period), 1 = correct in another style, 0 = wrong (or no embedded question in ``prompt``)."""
    question = parse_question(prompt)
    if question is None or extract_answer(response) != question.answer:
        return 0
    return 2 if _first_line(response) == question.preferred else 1


# ---------------------------------------------------------------------------------------------- records
def _question(fact: Fact) -> Question:
    question = parse_question(fact.question)
    if question is None or question.answer != fact.answer:
        raise ValueError(f"the gold judge cannot solve the embedded question {fact.question!r}")
    return question


def _weighted_style(rng: random.Random, weights: Mapping[str, float]) -> str:
    names = sorted(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def check_style_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` as a dict, after checking the style names and that they are non-negative with a positive sum."""
    unknown = sorted(set(weights) - set(STYLES))
    if unknown:
        raise ValueError(f"unknown answer style(s) {', '.join(unknown)} (expected some of {', '.join(STYLES)})")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"answer style weights must be >= 0 with a positive sum, got {dict(weights)}")
    return dict(weights)


def styled_instruction_records(facts: Sequence[Fact], seed: int,
                               weights: Mapping[str, float] | None = None) -> list[dict]:
    """Alpaca records whose ``output`` answers in a style drawn per fact with ``weights`` (default
    :data:`DEFAULT_STYLE_WEIGHTS`); ``task`` and ``style`` name the family and the style."""
    weights = check_style_weights(DEFAULT_STYLE_WEIGHTS if weights is None else weights)
    rng = random.Random(seed)
    records = []
    for fact in facts:
        style = _weighted_style(rng, weights)
        records.append({"instruction": fact.question, "input": "", "output": _question(fact).render(style),
                        "task": fact.task, "style": style})
    return records


MissKind = Literal["swap", "item", "length", "off_by_one", "far"]
# Kinds of wrong answer for the reward model's pairs, by the errors the SFT policy makes (docs/rlhf.md, fourth session:
# 8 samples of each held-out prompt at temperature 0.7). Sequences (reverse, sort): ``swap``, two unequal neighbours
# swapped (2 of the 122 wrong sorts); ``item``, one item changed to another letter or digit (106 of them); ``length``,
# one item dropped or one added (most wrong reversals are too short or too long). Numbers (add, successor, max,
# count): ``off_by_one``, off by one (42 of 49 wrong counts, 14 of 17 wrong maxima); ``far``, another number of as many
# digits, at least 2 away (62 of 84 wrong sums, 59 of 83 wrong successors).
MISS_KINDS: tuple[MissKind, ...] = ("swap", "item", "length", "off_by_one", "far")
# The default: the nearest misses of the first design. The five kinds trained a reward model that ranked fewer
# held-out pairs right (81.8% against 83.4%) and fewer pairs of the policy's own samples (74.8% against 81.9%).
NEAREST_MISSES: tuple[MissKind, ...] = ("swap", "off_by_one")
_SEQUENCE_MISSES: tuple[MissKind, ...] = ("swap", "item", "length")
_NUMBER_MISSES: tuple[MissKind, ...] = ("off_by_one", "far")
SEQUENCE_TASKS = ("reverse", "sort")  # families whose answer is a spaced list of letters or digits


def _other_item(item: str, rng: random.Random) -> str:
    """Another digit for a digit, another letter for a letter, drawn uniformly."""
    alphabet = string.digits if item.isdigit() else string.ascii_lowercase
    return rng.choice([c for c in alphabet if c != item])


def _next_item(item: str) -> str:
    """The next digit or letter, wrapping around (9 -> 0, z -> a)."""
    alphabet = string.digits if item.isdigit() else string.ascii_lowercase
    return alphabet[(alphabet.index(item) + 1) % len(alphabet)]


def near_miss(fact: Fact, rng: random.Random, kinds: Sequence[str] = NEAREST_MISSES) -> str:
    """A plausible wrong answer of one of ``kinds`` (:data:`MISS_KINDS`), drawn uniformly among those that fit the
    fact (sequence kinds for reverse and sort, number kinds for the others; the nearest miss, ``swap`` or
    ``off_by_one``, when none fits). The default, :data:`NEAREST_MISSES`, gives the nearest misses: off by one for
    numbers, two unequal neighbours swapped for sequences (one item changed by one step when all items are equal).
    """
    fits = _SEQUENCE_MISSES if fact.task in SEQUENCE_TASKS else _NUMBER_MISSES
    usable = [k for k in fits if k in kinds] or [fits[0]]
    kind = usable[0] if len(usable) == 1 else rng.choice(usable)
    if fact.task in SEQUENCE_TASKS:
        items = fact.answer.split(" ")
        if kind == "item":
            i = rng.randrange(len(items))
            items[i] = _other_item(items[i], rng)
        elif kind == "length":
            if len(items) > 1 and rng.random() < 0.5:
                del items[rng.randrange(len(items))]
            else:
                items.insert(rng.randrange(len(items) + 1), _other_item(rng.choice(items), rng))
        else:
            adjacent = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
            if adjacent:
                i = rng.choice(adjacent)
                items[i], items[i + 1] = items[i + 1], items[i]
            else:  # every item equal: change one by one step
                i = rng.randrange(len(items))
                items[i] = _next_item(items[i])
        return " ".join(items)
    n = int(fact.answer)
    if kind == "far":  # as many digits as the answer: a wrong answer of the same form (a digit for a maximum)
        low = 0 if len(fact.answer) == 1 else 10 ** (len(fact.answer) - 1)
        return str(rng.choice([m for m in range(low, 10 ** len(fact.answer)) if abs(m - n) >= 2]))
    return str(rng.choice([m for m in (n - 1, n + 1) if m >= 0]))


def _pair(kind: str, question: Question, wrong: str, rng: random.Random) -> tuple[str, str]:
    """Two responses of different gold rank for one kind of comparison (unordered: the judge orders them)."""
    others = [s for s in STYLES if s != PREFERRED_STYLE]
    if kind == "style":
        return question.render(PREFERRED_STYLE), question.render(rng.choice(others))
    if kind == "correctness":
        style = rng.choice(STYLES)
        return question.render(style), question.render(style, wrong)
    if kind == "cross":
        return question.render(rng.choice(others)), question.render(PREFERRED_STYLE, wrong)
    if kind == "restatement":
        return question.render(PREFERRED_STYLE), misstated(question, rng).render(PREFERRED_STYLE, question.answer)
    raise ValueError(f"unknown pair kind {kind!r} (expected one of {', '.join(ALL_PAIR_KINDS)})")


def misstated(question: Question, rng: random.Random) -> Question:
    """The question with one slot changed (a number off by one; one item of a sequence changed by one step), so
    that a sentence restating it restates it wrongly."""
    values = dict(question.values)
    name = rng.choice(sorted(values))
    items = values[name].split(" ")
    i = rng.randrange(len(items))
    item = items[i]
    items[i] = str(int(item) + 1) if item.isdigit() and len(items) == 1 else _next_item(item)
    values[name] = " ".join(items)
    return Question(question.task, tuple(values.items()), question.answer)


def gold_pair_records(facts: Sequence[Fact], seed: int, kinds: Sequence[str] = PAIR_KINDS,
                      misses: Sequence[str] = NEAREST_MISSES) -> list[dict]:
    """Preference pairs labelled by the gold judge: for each fact, one pair of each of ``kinds`` (Alpaca fields
    ``instruction``, ``input``, ``chosen``, ``rejected``, plus ``task`` and ``kind``); ``chosen`` is the response the
    judge ranks higher; :func:`near_miss` draws the wrong answers from ``misses``. ``restatement`` pairs are made
    only for the families whose sentence copies the question (add, successor, sort, max)."""
    rng = random.Random(seed)
    records = []
    for fact in facts:
        question = _question(fact)
        for kind in kinds:
            if kind == "restatement" and not FAMILIES[question.task].restates_slots:
                continue  # a sentence that copies nothing from the question cannot restate it wrongly
            first, second = _pair(kind, question, near_miss(fact, rng, misses), rng)
            ranks = gold_rank(fact.question, first), gold_rank(fact.question, second)
            if ranks[0] == ranks[1]:
                raise AssertionError(f"a {kind} pair the gold judge ties: {first!r} / {second!r}")
            chosen, rejected = (first, second) if ranks[0] > ranks[1] else (second, first)
            records.append({"instruction": fact.question, "input": "", "chosen": chosen, "rejected": rejected,
                            "task": fact.task, "kind": kind})
    return records
