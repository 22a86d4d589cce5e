"""Unit tests for lit_ft.rl.losses against hand-computed values (arithmetic in the comments)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from lit_ft.rl.advantages import explained_variance, gae, masked_mean, masked_sum, masked_var, masked_whiten
from lit_ft.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty
from lit_ft.rl.losses import (
    entropy_from_logits,
    eos_penalty,
    logprobs_from_logits,
    policy_loss,
    token_rewards,
    value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- masked stats


def test_masked_stats():
    x = t([1.0, 2.0, 3.0], [4.0, 100.0, float("inf")])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert masked_sum(x, mask).item() == pytest.approx(10.0)  # 1+2+3+4, padding (incl. inf) ignored
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.0]))
    # deviations from 2.5: -1.5, -0.5, 0.5, 1.5 -> squares sum 5.0; unbiased 5/3, biased 5/4
    assert masked_var(x, mask).item() == pytest.approx(5.0 / 3.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)
    # a single real token: no Bessel correction (count 1), variance 0; empty mask -> 0, not NaN
    assert masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]])).item() == 0.0
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0


def test_masked_whiten():
    x = t([1.0, 2.0, 3.0], [4.0, 100.0, 100.0])
    mask = t([1, 1, 1], [1, 0, 0])
    w = masked_whiten(x, mask)
    # mean 2.5, unbiased var 5/3 -> (x - 2.5) / sqrt(5/3); padding -> 0
    s = math.sqrt(5.0 / 3.0)
    assert_close(w, t([-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]))
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    # shift_mean=False: scale normalised, mean 2.5 kept
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w2, mask).item() == pytest.approx(2.5)
    assert masked_var(w2, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert w2[1, 1].item() == 0.0 and w2[1, 2].item() == 0.0


# ----------------------------------------------------------------------------------------------- KL / rewards


def test_kl_estimators():
    logp = t([-1.0, -2.0, -0.5])
    ref = t([-1.5, -2.0, -0.3])
    # k1 = logp - ref = [0.5, 0, -0.2]
    assert_close(kl_penalty(logp, ref, "k1"), t([0.5, 0.0, -0.2]))
    # k3 with r = ref - logp = [-0.5, 0, 0.2]: exp(r) - 1 - r
    #   exp(-0.5) - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307 ; 0 ; exp(0.2) - 1.2 = 1.2214028 - 1.2 = 0.0214028
    k3 = kl_penalty(logp, ref, "k3")
    assert_close(k3, t([0.1065307, 0.0, 0.0214028]), atol=1e-6, rtol=1e-5)
    assert (k3 >= 0).all()
    # small differences: k3 = d^2/2 - d^3/6 + ... ~ k1^2 / 2 (relative error ~ d/3)
    d = torch.tensor([[1e-2, -1e-2, 5e-3]], dtype=torch.float64)
    k1 = kl_penalty(d, torch.zeros_like(d), "k1")
    assert_close(kl_penalty(d, torch.zeros_like(d), "k3"), k1**2 / 2, rtol=1e-2, atol=0.0)
    with pytest.raises(ValueError, match="k1.*k3"):
        kl_penalty(logp, ref, "k2")


def test_token_rewards():
    scores = torch.tensor([2.0, -1.0, 5.0])
    logp = t([-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0])
    ref = t([-1.5, -2.0, -0.3], [-1.2, -7.0, -9.0], [-2.0, -2.0, -2.0])
    mask = t([1, 1, 1], [1, 0, 0], [0, 0, 0])
    rewards, kl = token_rewards(scores, logp, ref, mask, beta=0.1)
    # row 0: kl = [0.5, 0, -0.2] -> -0.1*kl = [-0.05, 0, 0.02]; score 2.0 on last token -> 2.02
    # row 1: kl = [0.2, (masked) 0, 0] -> [-0.02 + (-1.0), 0, 0]
    # row 2: no real token -> no KL, no score
    assert_close(kl, t([0.5, 0.0, -0.2], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]))
    assert_close(rewards, t([-0.05, 0.0, 2.02], [-1.02, 0.0, 0.0], [0.0, 0.0, 0.0]))
    # k3 path: row 1 kl = exp(-0.2) - 1 + 0.2 = 0.8187308 - 0.8 = 0.0187308
    _, kl3 = token_rewards(scores, logp, ref, mask, beta=0.1, estimator="k3")
    assert kl3[1, 0].item() == pytest.approx(0.0187308, rel=1e-5)
    assert kl3[1, 1:].abs().sum().item() == 0.0


def test_eos_penalty():
    scores = torch.tensor([1.0, 2.0, 3.0])
    ended = torch.tensor([True, False, True])
    assert_close(eos_penalty(scores, ended, 1.5), torch.tensor([1.0, 0.5, 3.0]))  # only 2.0 - 1.5
    assert eos_penalty(scores, ended, None) is scores
    assert_close(eos_penalty(scores, ended, 0.0), scores)


# ----------------------------------------------------------------------------------------------- GAE


def test_gae_with_padding():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    rewards = t([1.0, 0.0, 2.0], [0.5, 1.0, 99.0])
    values = t([0.5, 1.0, 1.5], [1.0, 2.0, 50.0])
    mask = t([1, 1, 1], [1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0 (no padding), value after the last token = 0:
    #   t=2: delta = 2 + 0 - 1.5 = 0.5                         A2 = 0.5
    #   t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35                  A1 = 0.35 + 0.45*0.5 = 0.575
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4                   A0 = 1.4 + 0.45*0.575 = 1.65875
    # row 1 (t=2 is padding with garbage reward 99 / value 50):
    #   t=2: masked                                            A2 = 0
    #   t=1: delta = 1.0 + 0.9*0 - 2.0 = -1.0  (V after end=0) A1 = -1.0
    #   t=0: delta = 0.5 + 0.9*2.0 - 1.0 = 1.3                 A0 = 1.3 + 0.45*(-1.0) = 0.85
    assert_close(adv, t([1.65875, 0.575, 0.5], [0.85, -1.0, 0.0]))
    # returns = A + V: [2.15875, 1.575, 2.0] and [1.85, 1.0, 50.0 (A=0 at padding)]
    assert_close(ret, t([2.15875, 1.575, 2.0], [1.85, 1.0, 50.0]))
    # changing the padded garbage changes nothing at real positions
    adv2, _ = gae(t([1.0, 0.0, 2.0], [0.5, 1.0, -7.0]), t([0.5, 1.0, 1.5], [1.0, 2.0, -3.0]), mask, gamma, lam)
    assert_close(adv2, adv)
    # no gradient flows out of GAE
    v = values.clone().requires_grad_(True)
    assert not gae(rewards, v, mask, gamma, lam)[0].requires_grad


# ----------------------------------------------------------------------------------------------- PPO losses


def test_policy_loss_positive_advantage():
    ratios = [1.5, 0.7, 1.1]
    logp = torch.log(torch.tensor([ratios])).requires_grad_(True)
    old = torch.zeros(1, 3)
    adv = torch.ones(1, 3)
    mask = torch.ones(1, 3)
    loss, clipfrac, approx_kl = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # A = +1: unclipped -r, clipped -clamp(r, 0.8, 1.2), take the max
    #   r=1.5: max(-1.5, -1.2) = -1.2 (clipped active)
    #   r=0.7: max(-0.7, -0.8) = -0.7
    #   r=1.1: max(-1.1, -1.1) = -1.1 (equal, not counted as clipped)
    # loss = (-1.2 - 0.7 - 1.1) / 3 = -1.0 ; clipfrac = 1/3
    assert loss.item() == pytest.approx(-1.0, rel=1e-6)
    assert clipfrac.item() == pytest.approx(1.0 / 3.0)
    # approx_kl = mean(0.5 * log(r)^2)
    expected_kl = sum(0.5 * math.log(r) ** 2 for r in ratios) / 3  # ~0.0501172
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)
    assert not clipfrac.requires_grad and not approx_kl.requires_grad
    # the clipped token gets no gradient; the others get d(-r)/dlogp / 3 = -r/3
    loss.backward()
    assert_close(logp.grad, torch.tensor([[0.0, -0.7 / 3, -1.1 / 3]]))
    # masking out the last token: (-1.2 - 0.7) / 2 = -0.95, clipfrac 1/2
    loss_m, clipfrac_m, _ = policy_loss(logp.detach(), old, adv, t([1, 1, 0]), clip_range=0.2)
    assert loss_m.item() == pytest.approx(-0.95, rel=1e-6)
    assert clipfrac_m.item() == pytest.approx(0.5)


def test_policy_loss_negative_advantage():
    logp = torch.log(torch.tensor([[1.5, 0.7, 1.1]]))
    loss, clipfrac, _ = policy_loss(logp, torch.zeros(1, 3), -torch.ones(1, 3), torch.ones(1, 3), clip_range=0.2)
    # A = -1: unclipped r, clipped clamp(r, 0.8, 1.2), take the max
    #   r=1.5: max(1.5, 1.2) = 1.5 ; r=0.7: max(0.7, 0.8) = 0.8 (clipped active) ; r=1.1: 1.1
    # loss = (1.5 + 0.8 + 1.1) / 3 = 3.4 / 3 ; clipfrac = 1/3
    assert loss.item() == pytest.approx(3.4 / 3.0, rel=1e-6)
    assert clipfrac.item() == pytest.approx(1.0 / 3.0)


def test_value_loss_clipping():
    values = t([1.0, 1.5, 0.9])
    old = t([1.0, 1.0, 0.0])
    returns = t([2.0, 1.0, 1.0])
    mask = torch.ones(1, 3)
    loss, clipfrac = value_loss(values, old, returns, mask, clip_range=0.2)
    # t0: v-old = 0   -> vc = 1.0; (v-R)^2 = 1.00, (vc-R)^2 = 1.00 -> 1.00 (equal, not clipped)
    # t1: v-old = 0.5 -> vc = 1.2; (v-R)^2 = 0.25, (vc-R)^2 = 0.04 -> 0.25
    # t2: v-old = 0.9 -> vc = 0.2; (v-R)^2 = 0.01, (vc-R)^2 = 0.64 -> 0.64 (clipped active)
    # loss = 0.5 * (1 + 0.25 + 0.64) / 3 = 0.5 * 1.89 / 3 = 0.315 ; clipfrac = 1/3
    assert loss.item() == pytest.approx(0.315, rel=1e-5)
    assert clipfrac.item() == pytest.approx(1.0 / 3.0)
    # no clipping: 0.5 * (1 + 0.25 + 0.01) / 3 = 0.21
    loss_n, clipfrac_n = value_loss(values, old, returns, mask, clip_range=None)
    assert loss_n.item() == pytest.approx(0.21, rel=1e-5)
    assert clipfrac_n.item() == 0.0
    # masking t2 out: 0.5 * (1 + 0.25) / 2 = 0.3125, nothing clipped
    loss_m, clipfrac_m = value_loss(values, old, returns, t([1, 1, 0]), clip_range=0.2)
    assert loss_m.item() == pytest.approx(0.3125, rel=1e-5)
    assert clipfrac_m.item() == 0.0


# ----------------------------------------------------------------------------------------------- logits / diagnostics


def test_entropy_from_logits():
    uniform = torch.zeros(2, 3, 7, dtype=torch.bfloat16)
    ent = entropy_from_logits(uniform)
    assert ent.dtype == torch.float32 and ent.shape == (2, 3)
    assert_close(ent, torch.full((2, 3), math.log(7)))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_logprobs_from_logits():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 1.0], [1.0, 1.0, 2.0]]]))
    tokens = torch.tensor([[1, 0]])
    lp = logprobs_from_logits(logits.to(torch.bfloat16), tokens)
    # probs [0.25, 0.5, 0.25]: token 1 -> log 0.5 ; row 2 token 0 -> log 0.25 (bf16 logits: loose tolerance)
    assert lp.dtype == torch.float32
    assert_close(lp, torch.tensor([[math.log(0.5), math.log(0.25)]]), atol=1e-2, rtol=0.0)
    # temperature 2: softmax(log([1, 2, 1]) / 2) = [1, sqrt2, 1] / (2 + sqrt2)
    lp_t = logprobs_from_logits(logits, tokens, temperature=2.0)
    z = 2 + math.sqrt(2)
    assert_close(lp_t, torch.tensor([[math.log(math.sqrt(2) / z), math.log(1 / z)]]))


def test_explained_variance():
    returns = t([1.0, 2.0, 3.0])
    mask = torch.ones(1, 3)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    # residual [0, 0, 1]: unbiased var 1/3 ; var(returns) = 1 -> 1 - 1/3 = 2/3
    assert explained_variance(t([1.0, 2.0, 2.0]), returns, mask).item() == pytest.approx(2.0 / 3.0)
    constant = explained_variance(t([0.0, 0.0, 0.0]), t([5.0, 5.0, 5.0]), mask)
    assert constant.item() == 0.0 and constant.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(init_beta=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=6.6, n_steps=256)
    # error = 6.6/6 - 1 = 0.1 -> beta = 0.2 * (1 + 0.1 * 256/10000) = 0.2 * 1.00256 = 0.200512
    assert ctl.beta == pytest.approx(0.200512)
    beta = ctl.beta
    ctl.update(current_kl=60.0, n_steps=1000)  # error 9 clamped to 0.2 -> * (1 + 0.02)
    assert ctl.beta == pytest.approx(beta * 1.02)
    beta = ctl.beta
    ctl.update(current_kl=0.0, n_steps=1000)  # error -1 clamped to -0.2 -> * (1 - 0.02)
    assert ctl.beta == pytest.approx(beta * 0.98)
    restored = AdaptiveKLController(init_beta=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.beta == ctl.beta  # exact
    with pytest.raises(ValueError):
        AdaptiveKLController(target=0.0)


def test_fixed_kl_controller_and_cli_signatures():
    ctl = FixedKLController(beta=0.1)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.beta == 0.1
    other = FixedKLController()
    other.load_state_dict(ctl.state_dict())
    assert other.beta == 0.1
    # LightningCLI class_path targets: every __init__ argument is named and annotated, no *args / **kwargs
    for cls in (FixedKLController, AdaptiveKLController):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert params and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        assert all(p.annotation is not inspect.Parameter.empty for p in params)
