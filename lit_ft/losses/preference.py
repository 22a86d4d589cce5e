"""Preference-optimisation losses (DPO, IPO, hinge, robust DPO, SimPO): pure functions, unit-tested by hand and
against TRL 1.16's trainers (``tests/unit/losses/test_preference.py``).

Conventions used throughout:

* A preference batch of ``B`` pairs gives four ``(B,)`` tensors: the policy's and the reference's sequence
  log-probs of the chosen and of the rejected response, each SUMMED over the response tokens only (prompt and
  padding excluded; :func:`sequence_logps`), and for the length-normalised losses (``ipo``, ``simpo``) the
  number of response tokens of each (``chosen_lengths``, ``rejected_lengths``).
* ``logratio = policy_logps - ref_logps`` and ``delta = chosen_logratio - rejected_logratio``; every loss but
  SimPO is a function of these (SimPO has no reference).
* Losses are per pair, ``(B,)``; :func:`preference_loss` averages them over the pairs, as TRL does.
* Math is done in at least float32 (bf16/fp16 inputs are upcast); float64 stays float64.
* When chosen and rejected go through the model in one forward (the module does this), the batch is ordered
  ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`` (TRL's order); ``logps.chunk(2)`` splits it.

Where TRL follows a convention the papers leave open, these functions follow TRL (each docstring says which).
TRL 1.16's ``DPOTrainer`` has ``sigmoid``, ``hinge``, ``ipo`` and ``robust``; SimPO lives in its experimental
``CPOTrainer`` (``loss_type="simpo"``, ``cpo_alpha=0``). Both are checked in the tests to 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lit_ft.errors import ConfigError
from lit_ft.losses.lm import shifted_targets
from lit_ft.rl.advantages import _f  # at least float32, as the RL losses
from lit_ft.rl.losses import logprobs_from_logits

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "simpo"]
LOSS_TYPES: tuple[str, ...] = LossType.__args__
REFERENCE_FREE: frozenset[str] = frozenset({"simpo"})  # loss types that never read reference log-probs
LENGTH_NORMALISED: frozenset[str] = frozenset({"ipo", "simpo"})  # loss types that need the response lengths


@dataclass(frozen=True)
class PreferenceLossSettings:
    """Which preference loss, and its constants. Invalid values raise :class:`lit_ft.errors.ConfigError`."""

    loss_type: LossType = "sigmoid"  # DPO: the method most alignment recipes start from, and TRL's default
    # 0.1: the DPO paper's and TRL's default (IPO reads it as tau). SimPO wants a much larger beta: its paper
    # tunes beta in [2, 2.5], since its rewards are per-token averages, not sums.
    beta: float = 0.1
    # 0: the labels are trusted. Used by `sigmoid` (conservative DPO), `robust` and `simpo` as the probability
    # that a pair's label is flipped; the Robust DPO paper suggests 0.1. In [0, 0.5): at 0.5 no pair says anything.
    label_smoothing: float = 0.0
    # 0.5: TRL's CPOConfig default for SimPO's target reward margin (used by `simpo` only).
    simpo_gamma: float = 0.5
    # 0: the preference loss alone. > 0 adds this weight x the chosen responses' mean token NLL (RPO, Pang et al.
    # 2024; TRL's `loss_type=[..., "sft"]` with `loss_weights`): it keeps the chosen answers likely while the
    # margin grows, against DPO's known fall of both log-probs ("likelihood displacement") that costs correctness.
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type: {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0 (got {self.beta})")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must lie in [0, 0.5) (got {self.label_smoothing})")
        if not self.sft_weight >= 0:
            raise ConfigError(f"sft_weight: must be >= 0 (got {self.sft_weight})")
        if self.label_smoothing and self.loss_type in ("ipo", "hinge"):
            raise ConfigError(f"label_smoothing: {self.loss_type} has none; set it to 0 "
                              "(it applies to sigmoid, robust and simpo)")

    @property
    def needs_reference(self) -> bool:
        """False for the reference-free losses (SimPO): the module then skips the reference forward."""
        return self.loss_type not in REFERENCE_FREE


# --------------------------------------------------------------------------------------------------------
# Sequence log-probs
# --------------------------------------------------------------------------------------------------------


def _example_index(position_ids: torch.Tensor | None, shape: torch.Size, device: torch.device
                   ) -> tuple[torch.Tensor, int]:
    """For each next-token target (position t predicts t + 1), the example it belongs to, and how many there are.

    Padded batches (``position_ids`` None): the example is the row. Packed rows: an example starts wherever
    ``position_ids`` is 0 (and at each row's first token); examples are numbered in row-major order, padding
    segments included. A target belongs to the example of the token it predicts (t + 1).
    """
    rows, width = shape
    if position_ids is None:
        return torch.arange(rows, device=device)[:, None].expand(rows, width - 1), rows
    starts = position_ids.reshape(rows, width) == 0
    starts[:, 0] = True
    local = starts.long().cumsum(-1) - 1
    per_row = starts.long().sum(-1)
    first = per_row.cumsum(0) - per_row  # number of examples in the rows above
    return (local + first[:, None])[:, 1:], int(per_row.sum())


def _sum_per_example(token_logps: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, count: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``token_logps`` and ``mask`` at masked positions into ``count`` per-example totals."""
    token_logps = torch.where(mask, token_logps, torch.zeros_like(token_logps))
    sums = token_logps.new_zeros(count).index_add(0, index.reshape(-1), token_logps.reshape(-1))
    counts = torch.zeros(count, dtype=torch.long, device=mask.device).index_add(0, index.reshape(-1),
                                                                               mask.reshape(-1).long())
    return sums, counts


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's log-prob summed over its response tokens, and how many tokens that is.

    ``logits`` (B, T, V) and ``labels`` (B, T) are aligned with the input (position t's logits predict
    ``labels[t + 1]``, as in SFT); labels are -100 at prompt and padding tokens. Padded rows (``position_ids``
    None) give ``(B,)`` sums and counts, one per row. Packed rows (``position_ids`` restarting at 0 at each
    example) give one per example in row-major order, padding segments included (with count 0): the label of
    each example's first token must be -100 (the packed collator does this), so no target crosses a boundary.

    Log-softmax in float32 (or float64 for float64 logits), one row at a time so that only one row's
    ``(T, V)`` float32 copy exists at once (:func:`lit_ft.rl.losses.logprobs_from_logits`, as PPO).
    """
    mask, targets = shifted_targets(labels)
    token_logps = logprobs_from_logits(logits[:, :-1], torch.where(mask, targets, torch.zeros_like(targets)))
    index, count = _example_index(position_ids, labels.shape, labels.device)
    return _sum_per_example(token_logps, mask, index, count)


def sequence_logps_from_hidden(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                               position_ids: torch.Tensor | None = None, chunk_size: int = 4096
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` from the last hidden states, projecting only the response positions through ``head``.

    Prompt and padding positions never reach the vocabulary projection (as in SFT's
    :func:`lit_ft.losses.lm.supervised_token_loss`), and the ``tokens x vocab`` logits exist one chunk of
    ``chunk_size`` positions at a time. Same results as :func:`sequence_logps` on ``head(hidden)`` (tested).
    """
    mask, targets = shifted_targets(labels)
    selected, wanted = hidden[:, :-1][mask], targets[mask]
    parts = []
    for start in range(0, selected.shape[0], chunk_size):
        logits = _f(head(selected[start : start + chunk_size]))
        picked = logits.gather(-1, wanted[start : start + chunk_size, None]).squeeze(-1)
        parts.append(picked - torch.logsumexp(logits, dim=-1))
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    token_logps = torch.zeros(mask.shape, dtype=dtype, device=hidden.device)
    if parts:
        token_logps = token_logps.masked_scatter(mask, torch.cat(parts).to(dtype))
    index, count = _example_index(position_ids, labels.shape, labels.device)
    return _sum_per_example(token_logps, mask, index, count)


# --------------------------------------------------------------------------------------------------------
# Losses: per pair, (B,)
# --------------------------------------------------------------------------------------------------------


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss when the label is flipped w.p. eps."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO: -log sigmoid(beta * delta); with ``label_smoothing`` eps, conservative DPO (cDPO, Mitchell 2023):
    -(1 - eps) log sigmoid(beta * delta) - eps log sigmoid(-beta * delta).

    TRL convention: TRL < 1.0's ``DPOTrainer`` and 1.16's ``CPOTrainer`` smooth this way; 1.16's
    ``DPOTrainer`` ignores ``label_smoothing`` for ``sigmoid`` (it only reads it for ``robust`` and ``exo_pair``),
    so lit_ft equals TRL 1.16's ``sigmoid`` at eps = 0 only.
    """
    return _smoothed_logistic(beta * _f(delta), label_smoothing)


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): the unbiased loss under labels flipped with probability eps,
    [-(1 - eps) log sigmoid(beta * delta) + eps log sigmoid(-beta * delta)] / (1 - 2 eps). Equal to DPO at eps = 0.
    """
    z = beta * _f(delta)
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-style hinge: relu(1 - beta * delta), i.e. a margin of 1 / beta on delta (TRL's parameterisation)."""
    return torch.relu(1.0 - beta * _f(delta))


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_lengths: torch.Tensor,
             rejected_lengths: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, beta = tau): (h - 1 / (2 beta))^2 with h the difference of the PER-TOKEN
    log-ratios, ``chosen_logratio / chosen_length - rejected_logratio / rejected_length``.

    TRL convention, not in the paper: the log-ratios are averaged over the response tokens (lengths clamped to at
    least 1) rather than summed, so that the squared loss does not grow with the response length; TRL says the
    IPO authors confirmed their reported results use this normalised form.
    """
    h = (_f(chosen_logratios) / _f(chosen_lengths).clamp(min=1.0)
         - _f(rejected_logratios) / _f(rejected_lengths).clamp(min=1.0))
    return (h - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, beta: float, gamma: float, label_smoothing: float = 0.0
               ) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free: -log sigmoid(beta * (avg_chosen - avg_rejected) - gamma),
    with ``avg = summed log-prob / response length`` and ``gamma`` the target reward margin.

    TRL convention (``CPOTrainer``, ``loss_type="simpo"``): ``label_smoothing`` smooths it as in cDPO
    (:func:`sigmoid_loss`); the paper has no smoothing.
    """
    avg_chosen = _f(chosen_logps) / _f(chosen_lengths).clamp(min=1.0)
    avg_rejected = _f(rejected_logps) / _f(rejected_lengths).clamp(min=1.0)
    return _smoothed_logistic(beta * (avg_chosen - avg_rejected) - gamma, label_smoothing)


# --------------------------------------------------------------------------------------------------------
# The loss a module calls, its implicit rewards and TRL-named metrics
# --------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceOutput:
    """What :func:`preference_loss` returns: the loss to back-propagate and the detached per-pair rewards."""

    loss: torch.Tensor  # scalar: mean of ``losses``
    losses: torch.Tensor  # (B,) per pair
    chosen_rewards: torch.Tensor  # (B,) detached implicit rewards
    rejected_rewards: torch.Tensor  # (B,)


def sft_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The chosen responses' negative log-likelihood per token, over every chosen token of the batch (TRL's
    ``"sft"`` loss type: the mean over tokens, not over pairs)."""
    return -_f(chosen_logps).sum() / _f(chosen_lengths).sum().clamp(min=1.0)


def preference_loss(settings: PreferenceLossSettings, policy_chosen_logps: torch.Tensor,
                    policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None = None,
                    ref_rejected_logps: torch.Tensor | None = None, chosen_lengths: torch.Tensor | None = None,
                    rejected_lengths: torch.Tensor | None = None) -> PreferenceOutput:
    """The loss ``settings.loss_type`` names, averaged over the pairs, with the implicit rewards.

    Rewards: ``beta * (policy_logps - ref_logps)`` (DPO's implicit reward, TRL's ``rewards/*``); for SimPO,
    which has no reference, ``beta * policy_logps / length`` (the paper's reward, TRL's CPOTrainer's).
    Reference log-probs are required unless the loss is reference-free; lengths for ``ipo`` and ``simpo``, and
    for ``settings.sft_weight > 0``, which adds that weight x :func:`sft_loss` to the mean loss.
    """
    kind, beta, eps = settings.loss_type, settings.beta, settings.label_smoothing
    if settings.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {kind!r} needs the reference log-probs")
    if kind in LENGTH_NORMALISED and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {kind!r} needs the response lengths")
    if settings.sft_weight and chosen_lengths is None:
        raise ValueError("sft_weight > 0 needs the chosen responses' lengths")
    if kind == "simpo":
        losses = simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
                            settings.simpo_gamma, eps)
        chosen_scores = _f(policy_chosen_logps) / _f(chosen_lengths).clamp(min=1.0)
        rejected_scores = _f(policy_rejected_logps) / _f(rejected_lengths).clamp(min=1.0)
    else:
        chosen_scores = _f(policy_chosen_logps) - _f(ref_chosen_logps)
        rejected_scores = _f(policy_rejected_logps) - _f(ref_rejected_logps)
        delta = chosen_scores - rejected_scores
        if kind == "sigmoid":
            losses = sigmoid_loss(delta, beta, eps)
        elif kind == "robust":
            losses = robust_loss(delta, beta, eps)
        elif kind == "hinge":
            losses = hinge_loss(delta, beta)
        else:  # ipo
            losses = ipo_loss(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths, beta)
    loss = losses.mean()
    if settings.sft_weight:
        loss = loss + settings.sft_weight * sft_loss(policy_chosen_logps, chosen_lengths)
    return PreferenceOutput(loss, losses, beta * chosen_scores.detach(), beta * rejected_scores.detach())


def preference_metrics(output: PreferenceOutput, policy_chosen_logps: torch.Tensor,
                       policy_rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch means under TRL's names, so that dashboards carry over (detached scalar tensors).

    ``rewards/accuracies`` counts a tie as wrong (chosen reward strictly higher); ``logps/*`` are the policy's
    summed sequence log-probs, as TRL's DPOTrainer logs them, for SimPO too (TRL's CPOTrainer logs averages).
    """
    chosen, rejected = output.chosen_rewards.detach(), output.rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": _f(policy_chosen_logps.detach()).mean(),
        "logps/rejected": _f(policy_rejected_logps.detach()).mean(),
    }
