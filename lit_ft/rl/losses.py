"""Policy-gradient losses and per-token rewards: the clipped PPO objective, the clipped value loss, entropy and
log-probs from logits.

Conventions used throughout:

* Every per-token tensor is ``(B, T)`` and covers the RESPONSE tokens only (the prompt is sliced off before
  these functions are called); ``logits`` are ``(B, T, V)``.
* ``mask`` is a float or bool ``(B, T)`` tensor: 1 at real response tokens, 0 after the response ended
  (padding). Responses are right-padded, i.e. each row's real tokens form a prefix.
* ``scores`` are per-sequence rewards ``(B,)`` from the reward model.
* Math is done in at least float32 (bf16/fp16 inputs are upcast); float64 inputs stay float64.
* Reductions over an empty mask return 0 rather than NaN, so a degenerate batch cannot poison a loss.
"""

from __future__ import annotations

import torch

from lit_ft.padding import last_token_index
from lit_ft.rl.advantages import _apply, _f, _m, masked_mean
from lit_ft.rl.kl import kl_penalty

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


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate: masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c))).

    Returns ``(loss, clipfrac, approx_kl)``: clipfrac is the fraction of real tokens where the clipped term is
    strictly larger (i.e. active), approx_kl is masked_mean(0.5 * (logp - old)^2); both are detached.
    """
    logprobs = _f(logprobs)
    log_ratio = logprobs - _f(old_logprobs.detach())
    ratio = torch.exp(log_ratio)
    adv = _f(advantages.detach())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
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
