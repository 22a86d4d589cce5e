"""Pairwise reward-model losses and metrics: plain functions of the chosen and rejected rewards, unit-tested.

Bradley-Terry: P(chosen preferred) = sigmoid(r_chosen - r_rejected). The loss is its negative log-likelihood,
optionally with a margin (Llama 2) and a term that keeps rewards centred on zero (Eisenstein et al. 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """mean(-log sigmoid(r_chosen - r_rejected - margin)); ``margin`` None is 0."""
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.to(diff)
    return -F.logsigmoid(diff).mean()


def center_rewards_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """mean((r_chosen + r_rejected)^2): zero when each pair's rewards sum to zero."""
    return ((chosen.float() + rejected.float()) ** 2).mean()


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """The training loss: pairwise loss plus ``center_rewards_coefficient`` x the centring term."""
    loss = pairwise_loss(chosen, rejected, margin)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * center_rewards_loss(chosen, rejected)
    return loss


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose chosen reward is strictly higher (a tie counts as wrong)."""
    return (chosen > rejected).float().mean()


class PairMetrics:
    """Running sums over many batches: accuracy, mean gap, loss, and the mean and std of every reward.

    Sums are kept as one float64 vector, so that DDP ranks combine with a single all-reduce (:meth:`reduce`).
    """

    FIELDS = ("pairs", "correct", "gap", "loss", "rewards", "reward_sum", "reward_sq_sum")

    def __init__(self) -> None:
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64)

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64)

    @torch.no_grad()
    def update(self, chosen: torch.Tensor, rejected: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        """Add one batch; ``loss`` is the batch's mean pairwise loss."""
        c, r = chosen.detach().double().cpu(), rejected.detach().double().cpu()
        both = torch.cat([c, r])
        n = len(c)
        batch_loss = float(loss) * n if loss is not None else 0.0
        self.sums += torch.tensor([n, float((c > r).sum()), float((c - r).sum()), batch_loss, len(both),
                                   float(both.sum()), float((both**2).sum())], dtype=torch.float64)

    def reduce(self, reduce_sum) -> None:
        """Sum across processes with ``reduce_sum`` (e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``)."""
        self.sums = reduce_sum(self.sums).detach().cpu().double()

    def compute(self) -> dict[str, float]:
        """accuracy, reward_gap, loss, reward_mean, reward_std (sample std over chosen and rejected), pairs."""
        pairs, correct, gap, loss, n, total, squares = self.sums.tolist()
        if pairs == 0:
            return {"pairs": 0, "accuracy": 0.0, "reward_gap": 0.0, "loss": 0.0, "reward_mean": 0.0,
                    "reward_std": 1.0}
        mean = total / n
        var = max(0.0, (squares - n * mean * mean) / max(1.0, n - 1))
        return {"pairs": int(pairs), "accuracy": correct / pairs, "reward_gap": gap / pairs, "loss": loss / pairs,
                "reward_mean": mean, "reward_std": math.sqrt(var)}
