"""Programmatic rewards for PPO: scores computed from the text, beside or instead of the reward model.

Any class with ``__call__(prompts, responses) -> tensor`` of one score per response works; give it in the PPO
config by ``class_path`` under ``model.rewards``. Scores of all rewards (and of the reward model, times
``reward_model_weight``) are added.

    rewards:
      - class_path: lit_ft.rl.rewards.ExactMatchReward
        init_args: {correct: 1.0, wrong: 0.0}

The same interface gives PPO its optional *gold* reward (``model.gold_reward``), which is logged beside the
reward-model score and never trained on: :class:`GoldReward` is the embedded world's hidden judge.
"""

from __future__ import annotations

import torch

from lit_ft.data.formats import Prompt
from lit_ft.data.gold import gold_rank
from lit_ft.metrics import exact_match


class ProgrammaticReward:
    """Base class: one score per (prompt, response). Subclasses implement :meth:`__call__`."""

    name = "programmatic"

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        raise NotImplementedError


class ExactMatchReward(ProgrammaticReward):
    """``correct`` when the response matches the prompt's reference answer exactly (after normalising
    whitespace and case), ``wrong`` when it does not, 0 for prompts without a reference.

    Args:
        correct: score of a right answer (1.0: on the scale of a normalised reward-model score).
        wrong: score of a wrong answer (0.0: the reward model already ranks near misses below right answers).
    """

    name = "exact_match"

    def __init__(self, correct: float = 1.0, wrong: float = 0.0):
        self.correct = correct
        self.wrong = wrong

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        scores = [0.0 if p.reference is None else (self.correct if exact_match(r, p.reference) else self.wrong)
                  for p, r in zip(prompts, responses)]
        return torch.tensor(scores, dtype=torch.float32)


class LengthPenalty(ProgrammaticReward):
    """``-per_token`` x the response length in words: a simple, checkable shaping term.

    Args:
        per_token: penalty per whitespace-separated word (0.01: small beside a unit-scale score).
    """

    name = "length_penalty"

    def __init__(self, per_token: float = 0.01):
        self.per_token = per_token

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        return torch.tensor([-self.per_token * len(r.split()) for r in responses], dtype=torch.float32)


class GoldReward(ProgrammaticReward):
    """The embedded world's hidden gold judge (:func:`lit_ft.data.gold.gold_rank`): 2 for a correct answer in the
    preferred style (a sentence restating the question), 1 for a correct answer in another style, 0 for a wrong
    one or a prompt without an embedded question. PPO logs it as ``gold/score``; it never enters the reward.
    """

    name = "gold"
    top_score = 2.0  # the judge's best rank: the share of responses reaching it is the gold win-rate

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> torch.Tensor:
        return torch.tensor([float(gold_rank(p.text, r)) for p, r in zip(prompts, responses)], dtype=torch.float32)
