"""Policy-gradient losses and per-token rewards: the clipped PPO objective, the clipped value loss, the
group-relative objective with its three normalisations (GRPO, DAPO, Dr. GRPO), entropy and log-probs from logits.

Conventions used throughout:

* Every per-token tensor is ``(B, T)`` and covers the RESPONSE tokens only (the prompt is sliced off before
  these functions are called); ``logits`` are ``(B, T, V)``.
* ``mask`` is a float or bool ``(B, T)`` tensor: 1 at real response tokens, 0 after the response ended
  (padding). Responses are right-padded, i.e. each row's real tokens form a prefix.
* ``scores`` are per-sequence rewards ``(B,)`` from the reward model; group advantages are ``(B,)`` too.
* Math is done in at least float32 (bf16/fp16 inputs are upcast); float64 inputs stay float64.
* Reductions over an empty mask return 0 rather than NaN, so a degenerate batch cannot poison a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lit_ft.padding import last_token_index
from lit_ft.rl.advantages import _apply, _f, _m, masked_mean
from lit_ft.rl.kl import KLEstimator, kl_penalty

# --------------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------------


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  beta: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL at every real token, plus the sequence score at each row's last real token.

    Returns ``(rewards, kl)``, both ``(B, T)``, with ``kl = kl_penalty(...) * mask``. A row with no real token
    (all-zero mask) gets no score at all: its rewards are all 0.
    """
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    m = _m(mask, kl)
    kl = _apply(kl, m)
    rewards = -beta * kl
    last = last_token_index(m)
    has_token = (m.sum(dim=1) > 0).to(kl.dtype)
    score = _f(scores).to(device=kl.device, dtype=kl.dtype) * has_token
    return rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1)), kl


def eos_penalty(scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """``scores - penalty`` for sequences that did not end with EOS (TRL's ``missing_eos_penalty``).

    ``penalty`` None or 0 returns ``scores`` unchanged.
    """
    if not penalty:
        return scores
    return torch.where(ended_with_eos.to(device=scores.device, dtype=torch.bool), scores, scores - penalty)


# --------------------------------------------------------------------------------------------------------
# Policy and value losses
# --------------------------------------------------------------------------------------------------------


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float, clip_range_high: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-token clipped objective, to minimise: max(-A * ratio, -A * clamp(ratio, 1 - c_low, 1 + c_high)).

    ``ratio = exp(logprobs - old_logprobs)``; ``advantages`` are ``(B, T)`` (PPO) or ``(B,)`` (one per sequence,
    broadcast over its tokens, as GRPO's). ``clip_range_high`` None clips symmetrically; DAPO's "clip-higher" sets
    it above ``clip_range`` (TRL's ``epsilon`` / ``epsilon_high``). Returns ``(loss, clipped, log_ratio)``, all
    ``(B, T)`` and unmasked: ``clipped`` (detached) is where the clipped term is strictly larger, i.e. active.
    """
    logprobs = _f(logprobs)
    log_ratio = logprobs - _f(old_logprobs.detach())
    ratio = torch.exp(log_ratio)
    adv = _f(advantages.detach())
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    high = clip_range if clip_range_high is None else clip_range_high
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach(), log_ratio


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate: masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c))).

    Returns ``(loss, clipfrac, approx_kl)``: clipfrac is the fraction of real tokens where the clipped term is
    strictly larger (i.e. active), approx_kl is masked_mean(0.5 * (logp - old)^2); both are detached.
    """
    per_token, clipped, log_ratio = clipped_surrogate(logprobs, old_logprobs, advantages, clip_range)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clipfrac = masked_mean(clipped.to(per_token.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * masked_mean(max((v - R)^2, (v_clipped - R)^2)), v_clipped = old + clamp(v - old).

    Returns ``(loss, clipfrac)``; clipfrac (detached) is the fraction of real tokens where the clipped error is
    strictly larger. ``clip_range`` None disables clipping: 0.5 * masked_mean((v - R)^2) and clipfrac 0.
    """
    values = _f(values)
    returns = _f(returns.detach())
    err = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(err, mask), torch.zeros((), dtype=values.dtype, device=values.device)
    old_values = _f(old_values.detach())
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, clipfrac


# --------------------------------------------------------------------------------------------------------
# Group-relative policy loss (GRPO, DAPO, Dr. GRPO): one advantage per sequence, no value head
# --------------------------------------------------------------------------------------------------------

LossNormalisation = Literal["grpo", "dapo", "dr_grpo"]


def normalise_token_loss(per_token: torch.Tensor, mask: torch.Tensor, normalisation: LossNormalisation,
                         max_completion_length: int | None = None, num_sequences: int | None = None,
                         num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar over the real tokens (``mask``); names are TRL's ``loss_type``.

    * ``"grpo"``: each sequence's mean over its tokens, then the mean over sequences (GRPO; a token of a short
      response weighs more than one of a long response).
    * ``"dapo"``: the sum over all tokens / the number of tokens (DAPO, Yu et al. 2025; every token weighs the same).
    * ``"dr_grpo"``: the sum over all tokens / (sequences x ``max_completion_length``), a constant (Dr. GRPO).

    A batch split into micro-batches passes the whole batch's ``num_sequences`` (grpo, dr_grpo) or ``num_tokens``
    (dapo, TRL's ``num_items_in_batch``): then the micro-batch losses add up to the whole batch's loss. They
    default to this call's own rows and real tokens (TRL's ``bnpo`` is ``"dapo"`` with the local count).
    """
    m = _m(mask, _f(per_token))
    summed = _apply(_f(per_token), m)
    sequences = per_token.shape[0] if num_sequences is None else num_sequences
    if normalisation == "grpo":
        return (summed.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / max(sequences, 1)
    if normalisation == "dapo":
        count = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=m.dtype, device=m.device)
        return summed.sum() / count.clamp(min=1.0)
    if normalisation == "dr_grpo":
        if not max_completion_length or max_completion_length < 1:
            raise ValueError("dr_grpo normalisation needs max_completion_length >= 1 (the sampler's max_new_tokens)")
        return summed.sum() / (max(sequences, 1) * max_completion_length)
    raise ValueError(f"unknown loss normalisation {normalisation!r}; choose 'grpo', 'dapo' or 'dr_grpo'")


@dataclass
class GroupPolicyLoss:
    """What :func:`group_policy_loss` returns.

    Attributes:
        loss: scalar with gradient, the objective to minimise.
        clipfrac: detached, the share of real tokens where the clip is active (TRL's ``clip_ratio/region_mean``).
        kl: detached, the mean per-token KL estimate to the reference over real tokens (0 when beta is 0).
    """

    loss: torch.Tensor
    clipfrac: torch.Tensor
    kl: torch.Tensor


def group_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_range: float = 0.2, normalisation: LossNormalisation = "grpo",
                      clip_range_high: float | None = None, ref_logprobs: torch.Tensor | None = None,
                      beta: float = 0.0, kl_estimator: KLEstimator = "k3", max_completion_length: int | None = None,
                      num_sequences: int | None = None,
                      num_tokens: float | torch.Tensor | None = None) -> GroupPolicyLoss:
    """The GRPO objective: the clipped surrogate per token, plus ``beta`` x the KL to the reference, reduced by
    :func:`normalise_token_loss`.

    Per token: max(-A * ratio, -A * clamp(ratio, 1 - c_low, 1 + c_high)) + beta * KL, with ``advantages`` ``(B,)``
    (one per sequence) or ``(B, T)``. As in TRL's ``GRPOTrainer._compute_loss``, the KL is added to the per-token
    loss before the normalisation (not to the reward, as PPO does).

    Args:
        clip_range: c_low (0.2: TRL's ``epsilon``, the PPO and GRPO papers' value).
        normalisation: "grpo" (the GRPO paper's; TRL defaults to "dapo"), "dapo" or "dr_grpo".
        clip_range_high: c_high; None for c_low (TRL's ``epsilon_high``; DAPO uses 0.28).
        ref_logprobs: the reference's log-probs, needed only when ``beta`` > 0.
        beta: KL coefficient (0.0: TRL's default; then no reference pass is needed).
        kl_estimator: "k3" (TRL's: exp(ref - logp) - (ref - logp) - 1, non-negative) or "k1".
        max_completion_length, num_sequences, num_tokens: see :func:`normalise_token_loss`.
    """
    per_token, clipped, _ = clipped_surrogate(logprobs, old_logprobs, advantages, clip_range, clip_range_high)
    kl = torch.zeros_like(per_token)
    if beta:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        per_token = per_token + beta * kl
    loss = normalise_token_loss(per_token, mask, normalisation, max_completion_length, num_sequences, num_tokens)
    with torch.no_grad():
        clipfrac, mean_kl = masked_mean(clipped.to(per_token.dtype), mask), masked_mean(kl.detach(), mask)
    return GroupPolicyLoss(loss, clipfrac, mean_kl)


# --------------------------------------------------------------------------------------------------------
# Logit utilities and diagnostics
# --------------------------------------------------------------------------------------------------------


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of softmax(logits) over the last dim, float32: logsumexp(l) - sum(softmax(l) * l)."""
    logits = _f(logits)
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at ``tokens``: ``(B, T, V), (B, T) -> (B, T)`` float32.

    Rows are processed one at a time so only one row's ``(T, V)`` float32 copy exists at once.
    """
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        logp = torch.log_softmax(_f(row_logits) / temperature, dim=-1)
        rows.append(logp.gather(-1, row_tokens.unsqueeze(-1).long()).squeeze(-1))
    return torch.stack(rows)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) gathered at ``tokens``, ``(B, T, V), (B, T) -> (B, T)`` float32, as
    :func:`logprobs_from_logits`, without keeping a ``(B, T, V)`` log-softmax for the backward pass: the token's logit
    minus the logsumexp over the vocabulary (one row at a time), whose backward needs only the logits themselves.
    GRPO's update uses it: at B x G responses per batch the log-softmax copy would be its largest tensor.
    """
    logits = _f(logits)
    picked = logits.gather(-1, tokens.unsqueeze(-1).long()).squeeze(-1)
    return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
