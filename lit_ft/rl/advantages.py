"""Advantages and the masked statistics behind them: GAE for PPO, group-relative advantages for GRPO and RLOO.

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

from dataclasses import dataclass
from typing import Literal

import torch


def _f(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a floating tensor of at least float32 precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _m(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool/float mask as a float tensor with ``like``'s dtype and device."""
    return mask.to(device=like.device, dtype=like.dtype)


def _apply(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` with masked-out positions exactly 0, even if ``x`` holds inf/NaN garbage there."""
    m = _m(mask, x)
    return torch.where(m != 0, x * m, torch.zeros_like(x))


# --------------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is 1; ``dim`` None sums over everything."""
    x = _f(x)
    prod = _apply(x, mask)
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over masked positions; ``dim`` None averages over everything. Empty mask -> 0."""
    x = _f(x)
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked positions (a scalar); Bessel-corrected when ``unbiased`` and count > 1."""
    x = _f(x)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = _m(mask, x).sum()
        var = torch.where(count > 1, var * count / (count - 1).clamp(min=1.0), var)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean/var over masked tokens only; masked-out positions are 0.

    With ``shift_mean=False`` the mean is added back (only the scale is normalised), as is usual for rewards.
    """
    x = _f(x)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _apply(whitened, mask)


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), computed backwards over T without gradient.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where the value after the
    last real token is 0 (the episode is over). Delta and the carried advantage are zeroed where mask == 0, so
    padding after the response cannot leak into earlier tokens; advantages at masked positions are 0.
    Returns ``(advantages, returns)`` with ``returns = advantages + values``.
    """
    rewards, values = _f(rewards.detach()), _f(values.detach())
    m = _m(mask, values)
    clean_rewards, clean_values = _apply(rewards, m), _apply(values, m)
    B, T = values.shape
    advantages = torch.zeros_like(values)
    carry = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        next_value = clean_values[:, t + 1] if t + 1 < T else torch.zeros_like(carry)
        delta = (clean_rewards[:, t] + gamma * next_value - clean_values[:, t]) * m[:, t]
        carry = (delta + gamma * lam * carry) * m[:, t]
        advantages[:, t] = carry
    return advantages, advantages + values


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - var(returns - values) / var(returns) over masked tokens; 0.0 when var(returns) is 0 (no NaN)."""
    values, returns = _f(values.detach()), _f(returns.detach())
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    safe = torch.where(var_returns > 0, var_returns, torch.ones_like(var_returns))
    return torch.where(var_returns > 0, 1.0 - var_residual / safe, torch.zeros_like(var_returns))


# --------------------------------------------------------------------------------------------------------
# Group-relative advantages (GRPO, Dr. GRPO, RLOO): G samples per prompt, one reward per sample
# --------------------------------------------------------------------------------------------------------

# Conventions: ``rewards`` are ``(N,)`` with N = prompts x G, prompt-major (row b * G + g is sample g of prompt b,
# as lit_ft.rl.rollout.sample(num_samples=G) returns them); advantages are ``(N,)``, one per sequence, and the
# losses broadcast them over the sequence's tokens.

AdvantageBaseline = Literal["group_mean", "leave_one_out"]
RewardScale = Literal["group", "batch", "none"]


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """An ``(N,)`` prompt-major tensor as ``(N / G, G)``: one row per prompt."""
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} samples do not split into groups of {group_size}")
    return x.reshape(-1, group_size)


def group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N / G,)`` Bessel-corrected standard deviation of each group's rewards (TRL's ``nanstd`` per group)."""
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 samples, got {group_size}")
    return grouped(_f(rewards), group_size).std(dim=1, unbiased=True)


def group_advantages(rewards: torch.Tensor, group_size: int, baseline: AdvantageBaseline = "group_mean",
                     scale: RewardScale = "group", eps: float = 1e-4) -> torch.Tensor:
    """Each sample's reward against its group's, ``(N,) -> (N,)``, without gradient.

    * GRPO (Shao et al. 2024, DeepSeekMath): ``baseline="group_mean", scale="group"``:
      A_i = (r_i - mean_g) / (std_g + eps).
    * Dr. GRPO (Liu et al. 2025): ``scale="none"``: A_i = r_i - mean_g (dividing by the std up-weights
      prompts whose rewards barely differ: too easy or too hard).
    * RLOO (Ahmadian et al. 2024): ``baseline="leave_one_out"``: A_i = r_i - mean of the other G - 1 rewards
      = G / (G - 1) * (r_i - mean_g); usually with ``scale="none"``.

    ``scale="batch"`` divides by the std of all N rewards instead (PPO-Lite). TRL's conventions, kept: the std
    is Bessel-corrected, ``eps`` (1e-4, TRL's) is added to the std rather than under the square root, and the
    values of ``scale`` are TRL's ``scale_rewards``.
    """
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 samples, got {group_size}")
    rewards = _f(rewards.detach())
    groups = grouped(rewards, group_size)
    if baseline == "group_mean":
        centred = groups - groups.mean(dim=1, keepdim=True)
    elif baseline == "leave_one_out":
        centred = groups - (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    else:
        raise ValueError(f"unknown baseline {baseline!r}; choose 'group_mean' or 'leave_one_out'")
    if scale == "group":
        centred = centred / (groups.std(dim=1, unbiased=True, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std(unbiased=True) + eps)
    elif scale != "none":
        raise ValueError(f"unknown reward scale {scale!r}; choose 'group', 'batch' or 'none'")
    return centred.reshape(-1)


@dataclass
class GroupRewardStats:
    """Rewards of a batch of groups, for logging.

    Attributes:
        mean: ``(N / G,)`` each group's mean reward.
        std: ``(N / G,)`` each group's Bessel-corrected reward std.
        zero_signal: the share of groups in which every sample got the same reward (to within ``atol``): their
            advantages are 0 and they teach nothing (TRL logs it as ``frac_reward_zero_std``).
    """

    mean: torch.Tensor
    std: torch.Tensor
    zero_signal: float


def group_reward_stats(rewards: torch.Tensor, group_size: int, atol: float = 0.0) -> GroupRewardStats:
    """Per-group reward mean and std, and the share of groups without signal.

    A group has no signal when max - min <= ``atol`` (0: exactly equal, as programmatic rewards are; TRL tests
    ``isclose(std, 0)``, i.e. std <= 1e-8, which the same rewards pass).
    """
    groups = grouped(_f(rewards.detach()), group_size)
    spread = groups.amax(dim=1) - groups.amin(dim=1)
    return GroupRewardStats(groups.mean(dim=1), group_std(rewards.detach(), group_size),
                            float((spread <= atol).float().mean()))
