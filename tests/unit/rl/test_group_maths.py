"""Group-relative RL maths (GRPO, Dr. GRPO, RLOO, DAPO) against hand-computed values (arithmetic in comments)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lit_ft.rl.advantages import group_advantages, group_reward_stats, grouped
from lit_ft.rl.losses import clipped_surrogate, group_policy_loss, normalise_token_loss, policy_loss

# Two prompts, G = 3: the first group's rewards differ, the second's are all equal (no signal).
REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])


def test_grouped_is_prompt_major() -> None:
    assert grouped(torch.arange(6), 3).tolist() == [[0, 1, 2], [3, 4, 5]]  # row b * G + g = sample g of prompt b
    with pytest.raises(ValueError, match="groups of 4"):
        grouped(torch.arange(6), 4)


# ------------------------------------------------------------------------------------------------ advantages
def test_grpo_advantages_divide_by_the_group_std() -> None:
    # group 1: mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1 -> (r - 2) / (1 + 1e-4); group 2: std 0 -> 0 / 1e-4
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    expected[:3] /= 1.0 + 1e-4
    assert_close(group_advantages(REWARDS, 3), expected)


def test_dr_grpo_advantages_drop_the_std() -> None:
    assert_close(group_advantages(REWARDS, 3, scale="none"), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    # the std no longer blows small differences up: a group 0.1 apart keeps its 0.05 advantages
    assert_close(group_advantages(torch.tensor([0.0, 0.1]), 2, scale="none"), torch.tensor([-0.05, 0.05]))
    assert group_advantages(torch.tensor([0.0, 0.1]), 2)[1].item() == pytest.approx(0.05 / (0.1 / math.sqrt(2) + 1e-4))


def test_rloo_advantages_leave_one_out() -> None:
    # 1 - (2 + 3) / 2 = -1.5; 2 - (1 + 3) / 2 = 0; 3 - (1 + 2) / 2 = 1.5; equal rewards -> 0
    rloo = group_advantages(REWARDS, 3, baseline="leave_one_out", scale="none")
    assert_close(rloo, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    # = G / (G - 1) x the group-mean advantage
    assert_close(rloo, 1.5 * group_advantages(REWARDS, 3, scale="none"))
    # G = 2: each sample against the other one
    assert_close(group_advantages(torch.tensor([4.0, 1.0]), 2, baseline="leave_one_out", scale="none"),
                 torch.tensor([3.0, -3.0]))


def test_batch_scale_divides_by_the_std_of_all_rewards() -> None:
    # all six: mean 3.5, squared deviations 6.25 + 2.25 + 0.25 + 3 x 2.25 = 15.5, Bessel variance 15.5 / 5 = 3.1
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (math.sqrt(3.1) + 1e-4)
    assert_close(group_advantages(REWARDS, 3, scale="batch"), expected)


def test_group_advantages_reject_bad_settings() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(REWARDS, 3, baseline="median")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(REWARDS, 3, scale="token")


def test_group_reward_stats_and_the_zero_signal_share() -> None:
    stats = group_reward_stats(REWARDS, 3)
    assert_close(stats.mean, torch.tensor([2.0, 5.0]))
    assert_close(stats.std, torch.tensor([1.0, 0.0]))
    assert stats.zero_signal == 0.5  # the second of two groups: every sample got 5
    # 0/1 rewards of 4 groups of 2: [1,1] and [0,0] carry no signal, [1,0] and [0,1] do
    assert group_reward_stats(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]), 2).zero_signal == 0.5
    assert group_reward_stats(torch.tensor([1.0, 1.001]), 2).zero_signal == 0.0  # exactly equal only
    assert group_reward_stats(torch.tensor([1.0, 1.001]), 2, atol=0.01).zero_signal == 1.0


# ----------------------------------------------------------------------------------------- clipped objective
# Old log-probs 0, so ratio = exp(logprobs). Row 0 has advantage +1, row 1 advantage -2 (one per sequence).
RATIOS = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.0]])
ADV = torch.tensor([1.0, -2.0])
# per token max(-A r, -A clamp(r, 0.8, 1.2)):
#   row 0 (A = 1):  r 1.5: max(-1.5, -1.2) = -1.2 (clip active); r 0.5: max(-0.5, -0.8) = -0.5; r 1.1: -1.1
#   row 1 (A = -2): r 1.5: max(3.0, 2.4) = 3.0; r 0.5: max(1.0, 1.6) = 1.6 (clip active); r 1.0: 2.0
PER_TOKEN = torch.tensor([[-1.2, -0.5, -1.1], [3.0, 1.6, 2.0]])


def test_clipped_surrogate_per_token() -> None:
    loss, clipped, log_ratio = clipped_surrogate(RATIOS.log(), torch.zeros(2, 3), ADV, 0.2)
    assert_close(loss, PER_TOKEN)
    assert clipped.tolist() == [[True, False, False], [False, True, False]]
    assert_close(log_ratio, RATIOS.log())
    # (B,) advantages broadcast over tokens exactly as the (B, T) ones they stand for
    assert_close(clipped_surrogate(RATIOS.log(), torch.zeros(2, 3), ADV[:, None].expand(2, 3), 0.2)[0], loss)
    # clip-higher (DAPO): upper bound 1 + 0.5, so row 0's ratio 1.5 is no longer clipped: -1.5
    high, clipped_high, _ = clipped_surrogate(RATIOS.log(), torch.zeros(2, 3), ADV, 0.2, clip_range_high=0.5)
    assert high[0, 0].item() == pytest.approx(-1.5) and not clipped_high[0, 0]
    assert high[1, 1].item() == pytest.approx(1.6)  # the lower bound stays 1 - 0.2


def test_ppo_policy_loss_is_the_same_surrogate_averaged_over_tokens() -> None:
    loss, clipfrac, _ = policy_loss(RATIOS.log(), torch.zeros(2, 3), ADV[:, None].expand(2, 3), torch.ones(2, 3), 0.2)
    assert loss.item() == pytest.approx(PER_TOKEN.mean().item())  # (-2.8 + 6.6) / 6
    assert clipfrac.item() == pytest.approx(2 / 6)


# -------------------------------------------------------------------------------------------- normalisations
LOSSES = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("inf"), float("nan")]])  # padding holds garbage
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_grpo_normalisation_averages_each_sequence_then_the_sequences() -> None:
    assert normalise_token_loss(LOSSES, MASK, "grpo").item() == pytest.approx(3.0)  # (2 + 4) / 2


def test_dapo_normalisation_averages_over_all_tokens() -> None:
    assert normalise_token_loss(LOSSES, MASK, "dapo").item() == pytest.approx(2.5)  # 10 / 4 tokens


def test_dr_grpo_normalisation_divides_by_a_constant() -> None:
    assert normalise_token_loss(LOSSES, MASK, "dr_grpo", max_completion_length=4).item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="max_completion_length"):  # 10 / (2 x 4)
        normalise_token_loss(LOSSES, MASK, "dr_grpo")


def test_micro_batches_add_up_to_the_whole_batch() -> None:
    # Rows one at a time with the whole batch's counts (2 sequences, 4 tokens) sum to the whole batch's loss.
    for normalisation, whole in (("grpo", 3.0), ("dapo", 2.5), ("dr_grpo", 1.25)):
        parts = [normalise_token_loss(LOSSES[r:r + 1], MASK[r:r + 1], normalisation, max_completion_length=4,
                                      num_sequences=2, num_tokens=4) for r in range(2)]
        assert sum(p.item() for p in parts) == pytest.approx(whole), normalisation
    # without them each micro-batch normalises by its own rows/tokens (TRL's bnpo for "dapo")
    assert normalise_token_loss(LOSSES[1:], MASK[1:], "dapo").item() == pytest.approx(4.0)


def test_an_empty_sequence_counts_as_a_zero_in_grpo() -> None:
    # row 1 has no real token: its mean is 0 (no NaN), and it still counts as one of two sequences (TRL's .mean())
    assert normalise_token_loss(LOSSES, torch.tensor([[1, 1, 1], [0, 0, 0]]), "grpo").item() == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------- the whole loss
def test_group_policy_loss_per_normalisation_and_its_gradient() -> None:
    logprobs = RATIOS.log().requires_grad_()
    out = group_policy_loss(logprobs, torch.zeros(2, 3), ADV, torch.ones(2, 3), 0.2, "grpo")
    # row means -2.8 / 3 and 6.6 / 3, then their mean: 3.8 / 6
    assert out.loss.item() == pytest.approx(3.8 / 6)
    assert out.clipfrac.item() == pytest.approx(2 / 6) and out.kl.item() == 0.0
    out.loss.backward()
    # d/dlogp of -A * r is -A * r; each token weighs 1 / (3 tokens x 2 sequences); clipped tokens get no gradient
    expected = -ADV[:, None] * RATIOS / 6
    expected[0, 0] = expected[1, 1] = 0.0
    assert_close(logprobs.grad, expected)
    dapo = group_policy_loss(RATIOS.log(), torch.zeros(2, 3), ADV, MASK, 0.2, "dapo")
    assert dapo.loss.item() == pytest.approx((-2.8 + 3.0) / 4)  # row 1 keeps its first token only
    dr = group_policy_loss(RATIOS.log(), torch.zeros(2, 3), ADV, MASK, 0.2, "dr_grpo", max_completion_length=5)
    assert dr.loss.item() == pytest.approx((-2.8 + 3.0) / 10)


def test_group_policy_loss_adds_k3_kl_to_the_reference() -> None:
    # one token, ratio 1, A = 1: surrogate -1. ref - logp = log 2: k3 = 2 - log 2 - 1 = 0.3069; beta 0.1
    logprobs, ref = torch.tensor([[0.0]]), torch.tensor([[math.log(2.0)]])
    out = group_policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), 0.2, "grpo",
                            ref_logprobs=ref, beta=0.1)
    k3 = 1.0 - math.log(2.0)
    assert out.kl.item() == pytest.approx(k3)
    assert out.loss.item() == pytest.approx(-1.0 + 0.1 * k3)
    # beta 0: no reference needed, no KL
    assert group_policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1)).loss.item() == -1.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        group_policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), beta=0.1)


def test_token_logprobs_by_hand_and_as_the_log_softmax_with_its_gradient() -> None:
    from lit_ft.rl.losses import logprobs_from_logits, token_logprobs

    # One position over a 2-token vocabulary: logits (0, ln 3) give p = (1/4, 3/4).
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert_close(token_logprobs(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]]))
    torch.manual_seed(0)
    a = torch.randn(3, 5, 11, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    tokens = torch.randint(0, 11, (3, 5))
    ours, theirs = token_logprobs(a, tokens), logprobs_from_logits(b, tokens)
    assert_close(ours, theirs)
    ours.sum().backward()
    theirs.sum().backward()
    assert_close(a.grad, b.grad)
