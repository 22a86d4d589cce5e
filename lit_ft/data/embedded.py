"""The embedded world as a record source: one definition that every stage's DataModule reads.

The facts come from :mod:`lit_ft.data.synthetic`; :class:`EmbeddedWorld` holds the settings of the world (how many
facts, which seed) once, and gives each data shape its records:

* ``text``: the pre-training corpus, prose stating every fact (SFT-train and held-out) in several phrasings, plus
  fresh facts; validation documents from other fresh facts. The held-out evaluation is given the held-out
  *instruction* prompts, to show that a pre-trained base rambles instead of answering (exact match ~0);
* ``instruction``: the SFT tasks, Alpaca records with exactly checkable answers, each answered in one of the answer
  styles of :mod:`lit_ft.data.gold` (the preferred full sentence a minority); the held-out split asks facts the
  SFT split never shows;
* ``preference``: pairs of the SFT facts labelled by the hidden gold judge (:func:`lit_ft.data.gold.gold_pair_records`:
  preferred style over another style, correct over a near miss, correct over a near miss in the preferred style),
  or with ``pairs.labels: near_miss`` the plain pairs chosen = the right answer, rejected = a near miss;
* ``prompt``: the SFT training instructions PPO samples from (of chosen task families, optionally balanced), and
  the held-out instructions, whose answers exact match checks.

Because every stage reads the same world, the base knows the facts SFT asks for, the reward model judges answers
to SFT's questions, and no stage ever trains on a held-out question. In YAML::

    data:
      class_path: lit_ft.data.preference.PreferenceDataModule
      init_args:
        source:
          class_path: lit_ft.data.embedded.EmbeddedWorld
          init_args:
            pairs: {kinds: [style, correctness, cross], extra_facts: 4000}
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from lit_ft.data.gold import (
    ALL_PAIR_KINDS,
    DEFAULT_STYLE_WEIGHTS,
    MISS_KINDS,
    NEAREST_MISSES,
    PAIR_KINDS,
    GoldJudge,
    MissKind,
    PairKind,
    check_style_weights,
    gold_pair_records,
    near_miss,
    styled_instruction_records,
)
from lit_ft.data.records import RecordShape, RecordSplits
from lit_ft.data.sources import DataError
from lit_ft.data.synthetic import (
    TASKS,
    Fact,
    corpus_records,
    generate_facts,
    instruction_records,
    split_facts,
)

# Each record set is a pure function of the world seed; these offsets give each its own random stream.
PAIRS_TRAIN_SEED_OFFSET = 7  # near misses of the training pairs
PAIRS_HELDOUT_SEED_OFFSET = 8  # near misses of the held-out pairs
PAIRS_EXTRA_SEED_OFFSET = 11  # fresh facts: the reward model's pairs, the prompts `lit-ft pairs` samples on
STYLE_TRAIN_SEED_OFFSET = 5  # answer styles of the SFT demonstrations
STYLE_VAL_SEED_OFFSET = 6  # answer styles of the held-out demonstrations (validation loss)
TEXT_VAL_SEED_OFFSET = 99  # the corpus's validation facts
TEXT_VAL_FACTS = 200  # 100 validation documents of 2 fresh facts each: a stable loss, ~2 s to score on CPU


# ------------------------------------------------------------------------------------ records from facts
def preference_records(facts: Sequence[Fact], seed: int, rejected_per_fact: int = 1,
                       misses: Sequence[str] = NEAREST_MISSES) -> list[dict]:
    """Bare-answer pairs (``instruction``, ``input``, ``chosen``, ``rejected``, ``task``) from embedded facts: the
    right answer over a near miss of ``misses`` (:func:`lit_ft.data.gold.near_miss`), ``pairs.labels: near_miss``.

    With ``rejected_per_fact`` > 1, each fact gives several pairs with distinct wrong answers (as many as exist).
    """
    rng = random.Random(seed)
    records = []
    for fact in facts:
        wrong: list[str] = []
        for _ in range(4 * rejected_per_fact):
            candidate = near_miss(fact, rng, misses)
            if candidate not in wrong and candidate != fact.answer:
                wrong.append(candidate)
            if len(wrong) == rejected_per_fact:
                break
        records += [{"instruction": fact.question, "input": "", "chosen": fact.answer, "rejected": w,
                     "task": fact.task} for w in wrong]
    return records


def balanced_by_task(facts: list[Fact]) -> list[Fact]:
    """Each task family's facts repeated (whole copies, then a leading part) up to the largest family's count,
    grouped by family in order of first appearance (the sampler shuffles them)."""
    families: dict[str, list[Fact]] = {}
    for fact in facts:
        families.setdefault(fact.task, []).append(fact)
    target = max((len(group) for group in families.values()), default=0)
    out: list[Fact] = []
    for group in families.values():
        out += [group[i % len(group)] for i in range(target)]
    return out


# ------------------------------------------------------------------------------------------ the world
@dataclass(frozen=True)
class CorpusSettings:
    """The pre-training corpus (shape ``text``).

    Args:
        extra_facts: fresh random facts stated once each, so that the skills (reverse, sort, count) generalise
            beyond the world's own facts (2000: as many as the SFT facts).
        sentences_per_doc: statements per document (6: documents of ~80 tokens).
    """

    extra_facts: int = 2000
    sentences_per_doc: int = 6


@dataclass(frozen=True)
class PairSettings:
    """The reward model's preference pairs (shape ``preference``).

    Args:
        labels: ``gold`` (default: the world is about a preference, issue 16): pairs ordered by the hidden gold
            judge, one of each of ``kinds`` per fact; ``near_miss``: bare answers, the right one over near misses.
        kinds: the gold-labelled comparisons made for every fact, training and held-out alike
            (:data:`lit_ft.data.gold.PAIR_KINDS`, all three by default): ``style`` (a correct answer in the
            preferred style over one in another style), ``correctness`` (a correct answer over a near miss, one
            style) and ``cross`` (a correct answer in another style over a near miss in the preferred style, so that
            the style never outweighs correctness); opt-in ``restatement`` (the preferred sentence over the same
            sentence restating the question wrongly; not yet measured, see docs/rlhf.md).
        misses: the kinds of wrong answer (:data:`lit_ft.data.gold.MISS_KINDS`, the errors the SFT policy makes,
            docs/rlhf.md): ``swap`` (two neighbours of a reversal or sort swapped), ``item`` (one item changed),
            ``length`` (one item dropped or added), ``off_by_one`` (a number off by one), ``far`` (a number of as many
            digits at least 2 away). Each wrong answer is one kind drawn uniformly among those fitting its fact.
            Default ``[swap, off_by_one]``, the nearest misses: with all five the reward model ranked fewer held-out
            and fewer on-policy pairs right (docs/rlhf.md, fourth session).
        rejected_per_fact: ``near_miss`` training pairs per fact, each with a different wrong answer (1: one near
            miss; the held-out split always has 1).
        extra_facts: fresh facts of the same tasks added to the training pairs (never a held-out question), so that
            the reward model learns to check answers rather than to remember the SFT facts (0: none).
    """

    labels: Literal["gold", "near_miss"] = "gold"
    kinds: list[PairKind] = field(default_factory=lambda: list(PAIR_KINDS))
    misses: list[MissKind] = field(default_factory=lambda: list(NEAREST_MISSES))
    rejected_per_fact: int = 1
    extra_facts: int = 0

    def __post_init__(self) -> None:
        if self.labels not in ("gold", "near_miss"):
            raise DataError(f"pairs.labels must be 'gold' or 'near_miss', got {self.labels!r}")
        for name, given, allowed in (("kinds", self.kinds, ALL_PAIR_KINDS), ("misses", self.misses, MISS_KINDS)):
            if not given or set(given) - set(allowed):
                raise DataError(f"pairs.{name}: expected some of {', '.join(allowed)}, got {list(given)}")
        if self.rejected_per_fact < 1:
            raise DataError(f"rejected_per_fact must be >= 1, got {self.rejected_per_fact}")

    def records(self, facts: Sequence[Fact], seed: int, heldout: bool) -> list[dict]:
        """The pairs of ``facts`` (``heldout``: one near miss per fact)."""
        if self.labels == "gold":
            return gold_pair_records(facts, seed, self.kinds, self.misses)
        return preference_records(facts, seed, 1 if heldout else self.rejected_per_fact, self.misses)


@dataclass(frozen=True)
class PromptSettings:
    """PPO's training prompts (shape ``prompt``); the held-out prompts keep every family, so that exact match
    compares with the SFT stage's.

    Args:
        tasks: task families the training prompts come from (None: all).
        balance_tasks: repeat each family's training prompts up to the largest family's count, so that each family
            is equally likely in a rollout batch (add and successor have under 100 distinct questions, the other
            families ~450); False: as generated.
        extra_facts: fresh facts of the same tasks added to the training prompts, never a held-out question: the
            same fresh facts as ``pairs.extra_facts`` (``lit-ft pairs`` samples the policy on them; 0: none).
    """

    tasks: list[str] | None = None
    balance_tasks: bool = False
    extra_facts: int = 0

    def __post_init__(self) -> None:
        if self.extra_facts < 0:
            raise DataError(f"prompts.extra_facts must be >= 0, got {self.extra_facts}")
        unknown = sorted(set(self.tasks or ()) - set(TASKS))
        if unknown:
            raise DataError(f"unknown embedded task(s) {', '.join(unknown)} (expected some of {', '.join(TASKS)})")


@dataclass(frozen=True)
class EmbeddedWorld:
    """The generated world of checkable facts, as records for every stage (see the module docstring).

    Args:
        num_train: facts SFT trains on (2000: every task family seen ~300 times).
        num_heldout: held-out facts, never trained on by any stage (200: +-3.5 points of sampling error at 50%).
        world_seed: seed of the world; every record set is a pure function of it (1234: the one the embedded base
            was pre-trained on; change it and pre-train again).
        answer_styles: weight of each answer style (``sentence``, ``bare``, ``label``) in the SFT demonstrations;
            None for :data:`lit_ft.data.gold.DEFAULT_STYLE_WEIGHTS` (the preferred ``sentence`` a 25% minority,
            so that RLHF has a preference to teach); ``{bare: 1.0}`` gives the plain answers of the first world.
        corpus: the pre-training corpus's settings.
        pairs: the preference pairs' settings.
        prompts: PPO's prompt settings.
    """

    num_train: int = 2000
    num_heldout: int = 200
    world_seed: int = 1234
    answer_styles: dict[str, float] | None = None
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    pairs: PairSettings = field(default_factory=PairSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_heldout < 0:
            raise DataError(f"the embedded world needs num_train >= 1 and num_heldout >= 0, got {self.num_train} "
                            f"and {self.num_heldout}")
        try:
            check_style_weights(DEFAULT_STYLE_WEIGHTS if self.answer_styles is None else self.answer_styles)
        except ValueError as err:
            raise DataError(f"answer_styles: {err}") from None

    @property
    def gold_judge(self) -> GoldJudge:
        """The hidden gold judge of the world's answers (read by the held-out evaluation, never by training)."""
        return GoldJudge()

    def facts(self) -> tuple[list[Fact], list[Fact]]:
        """(SFT-train facts, held-out facts): disjoint, no question in both."""
        return split_facts(self.world_seed, self.num_train, self.num_heldout)

    def fresh_facts(self, n: int) -> list[Fact]:
        """Of ``n`` fresh facts of the world's tasks, those that ask no SFT or held-out question (the same ones for
        the reward model's pairs and for the prompts ``lit-ft pairs`` samples on)."""
        if n <= 0:
            return []
        train, heldout = self.facts()
        seen = {f.question for f in train + heldout}
        return [f for f in generate_facts(n, self.world_seed + PAIRS_EXTRA_SEED_OFFSET) if f.question not in seen]

    def splits(self, shape: RecordShape) -> RecordSplits:
        """The records of one data shape (``text``, ``instruction``, ``preference`` or ``prompt``)."""
        train, heldout = self.facts()
        if shape == "text":
            docs = corpus_records(train + heldout, self.world_seed, self.corpus.extra_facts,
                                  self.corpus.sentences_per_doc)
            fresh = generate_facts(TEXT_VAL_FACTS, self.world_seed + TEXT_VAL_SEED_OFFSET)
            val = [{"text": " ".join(s for f in fresh[i : i + 2] for s in f.statements)}
                   for i in range(0, TEXT_VAL_FACTS, 2)]
            return RecordSplits(docs, val, heldout=instruction_records(heldout), checkable=True)
        if shape == "preference":
            train = train + self.fresh_facts(self.pairs.extra_facts)
            val = self.pairs.records(heldout, self.world_seed + PAIRS_HELDOUT_SEED_OFFSET, heldout=True)
            first = {r["instruction"]: r for r in reversed(val)}  # one pair per held-out question, for its prompt
            return RecordSplits(self.pairs.records(train, self.world_seed + PAIRS_TRAIN_SEED_OFFSET, heldout=False),
                                val, heldout=[first[f.question] for f in heldout])
        if shape == "prompt":
            train = train + self.fresh_facts(self.prompts.extra_facts)
            if self.prompts.tasks is not None:
                train = [f for f in train if f.task in self.prompts.tasks]
            if self.prompts.balance_tasks:
                train = balanced_by_task(train)
        elif shape == "instruction":  # styled demonstrations; the held-out evaluation checks the answer in any style
            return RecordSplits(
                styled_instruction_records(train, self.world_seed + STYLE_TRAIN_SEED_OFFSET, self.answer_styles),
                styled_instruction_records(heldout, self.world_seed + STYLE_VAL_SEED_OFFSET, self.answer_styles),
                heldout=instruction_records(heldout), checkable=True)
        else:
            raise DataError(f"the embedded world has no '{shape}' records (expected text, instruction, preference "
                            "or prompt)")
        return RecordSplits(instruction_records(train), instruction_records(heldout), checkable=True)
