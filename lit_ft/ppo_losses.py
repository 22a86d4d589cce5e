"""PPO (RLHF) building blocks: masked statistics, KL penalties, GAE, clipped losses and KL controllers.

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

from lit_ft.data.packing import last_token_index

KL_ESTIMATORS = ("k1", "k3")


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


# --------------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy.

    ``"k1"``: logp - ref_logp (unbiased, can be negative per token).
    ``"k3"``: (exp(ref - logp) - 1) - (ref - logp) (Schulman's unbiased, always non-negative, lower variance).
    """
    logprobs, ref_logprobs = _f(logprobs), _f(ref_logprobs)
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


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
# Advantages and losses
# --------------------------------------------------------------------------------------------------------


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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - var(returns - values) / var(returns) over masked tokens; 0.0 when var(returns) is 0 (no NaN)."""
    values, returns = _f(values.detach()), _f(returns.detach())
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    safe = torch.where(var_returns > 0, var_returns, torch.ones_like(var_returns))
    return torch.where(var_returns > 0, 1.0 - var_residual / safe, torch.zeros_like(var_returns))


# --------------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op."""

    def __init__(self, beta: float = 0.05) -> None:
        """
        Args:
            beta: KL penalty coefficient. 0.05 is TRL's ``PPOConfig.kl_coef`` default, a common starting point.
        """
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.beta = float(state_dict["beta"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences").

    error = clamp(current_kl / target - 1, -0.2, 0.2); beta *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_beta: float = 0.2, target: float = 6.0, horizon: int = 10000) -> None:
        """
        Args:
            init_beta: starting KL coefficient (0.2: the initial value in TRL's original adaptive-KL setup).
            target: KL (nats per sequence) to steer towards; 6.0 is the value used by Ziegler et al.
            horizon: number of samples over which beta adapts; 10000 as in Ziegler et al.
        """
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards keeping ``current_kl`` at ``target``; ``n_steps`` = samples seen since last update."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restores beta exactly; target/horizon come from the config and are kept as constructed."""
        self.beta = float(state_dict["beta"])
