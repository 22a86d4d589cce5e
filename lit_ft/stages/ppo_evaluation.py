"""PPO's held-out evaluation: what the greedy answers of a policy score, and the before/after table.

:class:`PPO <lit_ft.stages.ppo.PPO>` generates greedy answers to the held-out prompts before training and after,
and collects per prompt: whether the answer is right (exact match), the gold judge's score (when a gold reward is
given), the reward-model score, and the KL of the policy to the reference along the answer. This module turns
those lists into the summary figures, overall and per task family, and prints them side by side:

- gold win-rate: the share of answers the gold judge ranks top (correct and in the preferred style), so it can
  never exceed exact match;
- exact match: correctness alone;
- preferred share: the gold win-rate over exact match, the share of right answers in the preferred style;
- mean reward-model score (normalised with the reward model's stored mean and std);
- KL to the reference, mean and max over prompts: the exact per-token KL between the two (temperature-scaled)
  next-token distributions, summed along the greedy answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lit_ft.metrics import per_task_counts


def sequence_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t KL(p_t || q_t) over the masked positions of each row: the exact KL of the full next-token
    distributions (logits (B, T, V), mask (B, T)), in nats per response."""
    logp = policy_logits.float().log_softmax(-1)
    logq = reference_logits.float().log_softmax(-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * mask.float()).sum(-1)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass
class HeldoutResult:
    """Per-prompt results of one evaluation; any list may be empty when that measure was not taken."""

    texts: list[str]
    tasks: list[str | None]
    right: list[bool] = field(default_factory=list)  # exact match, where answers are checkable
    gold: list[float] = field(default_factory=list)  # the gold reward's score
    gold_top: float | None = None  # the gold reward's best score (its win), when it has one
    reward_model: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)

    def _figures(self, rows: list[int]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.right:
            out["exact_match"] = _mean([float(self.right[i]) for i in rows])
        if self.gold:
            out["gold_score"] = _mean([self.gold[i] for i in rows])
            if self.gold_top is not None:
                out["gold_win_rate"] = _mean([float(self.gold[i] >= self.gold_top) for i in rows])
                if out.get("exact_match"):
                    out["preferred_share"] = out["gold_win_rate"] / out["exact_match"]
        if self.reward_model:
            out["reward_model_score"] = _mean([self.reward_model[i] for i in rows])
        return out

    def summary(self) -> dict[str, float]:
        """Overall figures (plus KL mean and max), then ``<figure>/<family>`` for each task family."""
        everything = list(range(len(self.texts)))
        out = self._figures(everything)
        if self.kl:
            out["kl_mean"], out["kl_max"] = _mean(self.kl), max(self.kl)
        for task in per_task_counts([True] * len(self.tasks), self.tasks):
            for key, value in self._figures([i for i, t in enumerate(self.tasks) if t == task]).items():
                out[f"{key}/{task}"] = value
        return out

    def counts(self) -> str:
        """``family right/total`` per family, e.g. ``add 3/11, count 61/61``."""
        by_task = per_task_counts(self.right, self.tasks[: len(self.right)])
        return ", ".join(f"{task} {right}/{total}" for task, (right, total) in by_task.items())


_ROWS = (  # (key, label, format)
    ("gold_win_rate", "gold win-rate", "{:.1%}"),
    ("exact_match", "exact match", "{:.1%}"),
    ("preferred_share", "preferred share of right answers", "{:.1%}"),
    ("gold_score", "mean gold score", "{:.3f}"),
    ("reward_model_score", "mean reward-model score", "{:+.3f}"),
    ("kl_mean", "KL to the reference, mean (nats)", "{:.3f}"),
    ("kl_max", "KL to the reference, max (nats)", "{:.3f}"),
)


def _cell(figures: dict[str, float], key: str, fmt: str) -> str:
    return fmt.format(figures[key]) if key in figures else "-"


def before_after_table(before: dict[str, float], after: dict[str, float], prompts: int,
                       names: tuple[str, str] = ("SFT policy", "PPO policy")) -> str:
    """The before/after table of two :meth:`HeldoutResult.summary` dicts: the overall figures, then gold win-rate,
    exact match and reward-model score per task family."""
    label_width = 34
    lines = [f"{f'held-out, {prompts} prompts, greedy':<{label_width}} | {names[0]:>12} | {names[1]:>12}"]
    lines.append("-" * len(lines[0]))
    for key, label, fmt in _ROWS:
        if key in before or key in after:
            lines.append(f"{label:<{label_width}} | {_cell(before, key, fmt):>12} | {_cell(after, key, fmt):>12}")
    families = sorted({key.split("/", 1)[1] for key in (*before, *after) if "/" in key})
    per_family = [(k, label, fmt) for k, label, fmt in _ROWS[:5] if f"{k}/{families[0]}" in before] if families else []
    for task in families:
        for key, label, fmt in per_family:
            if key in ("gold_score", "preferred_share"):
                continue
            name = f"  {task}: {label}"
            lines.append(f"{name:<{label_width}} | {_cell(before, f'{key}/{task}', fmt):>12} | "
                         f"{_cell(after, f'{key}/{task}', fmt):>12}")
    return "\n".join(lines)
