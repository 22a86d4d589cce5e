"""Preference losses: hand-computed values, sequence log-probs (padded, packed, from hidden states), and the
equivalence with the losses TRL 1.16's trainers compute on the same tiny model, batch and reference."""

from __future__ import annotations

import math

import pytest
import torch

from lit_ft.backbone.packed_attention import register_packed_attention
from lit_ft.errors import ConfigError
from lit_ft.losses.lm import IGNORE_INDEX
from lit_ft.losses.preference import (
    PreferenceLossSettings,
    hinge_loss,
    ipo_loss,
    preference_loss,
    preference_metrics,
    robust_loss,
    sequence_logps,
    sequence_logps_from_hidden,
    sft_loss,
    sigmoid_loss,
    simpo_loss,
)
from lit_ft.padding import pad_rows
from tests.tiny_models import tiny_mistral

register_packed_attention()  # tiny_mistral sets the implementation on the config: transformers must know it

LN3 = math.log(3.0)
L1 = math.log1p(math.exp(-1.0))  # -log sigmoid(1) = log(1 + e^-1) = 0.3132617
L2 = math.log1p(math.e)  # -log sigmoid(-1) = log(1 + e) = 1.3132617; note L2 - L1 = 1 exactly


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------
# Sequence log-probs
# --------------------------------------------------------------------------------------------------------


def _three_position_logits() -> torch.Tensor:
    """V = 2. Position 0: [0, ln 3] -> p = [1/4, 3/4]; position 1: [ln 3, 0] -> p = [3/4, 1/4]; position 2: any."""
    return _t(0.0, LN3, LN3, 0.0, 5.0, -5.0).reshape(1, 3, 2)


def test_sequence_logps_sum_response_tokens_only() -> None:
    logits = _three_position_logits().expand(2, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0],  # targets: t=0 -> 1 (p 3/4), t=1 -> 0 (p 3/4)
                           [IGNORE_INDEX, IGNORE_INDEX, 1]])  # prompt, then t=1 -> 1 (p 1/4)
    sums, counts = sequence_logps(logits, labels)
    # row 0: 2 log(3/4) = -0.5753641; row 1: log(1/4) = -1.3862944
    torch.testing.assert_close(sums, _t(2 * math.log(0.75), math.log(0.25)))
    assert counts.tolist() == [2, 1]


def test_sequence_logps_of_packed_rows_are_per_example() -> None:
    logits = torch.cat([_three_position_logits(), _three_position_logits()], dim=1).expand(2, 6, 2)
    # position p of a row has logits of position p % 3 above
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2],  # two examples of 3 tokens
                                 [0, 1, 0, 1, 2, 3]])  # one example of 2 tokens, then a padding segment of 4
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX, IGNORE_INDEX, 1],
                           [IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    sums, counts = sequence_logps(logits, labels, position_ids)
    # example 0: t=0 -> 1 at pos 0 (3/4), t=1 -> 0 at pos 1 (3/4): 2 log(3/4)
    # example 1: t=2 -> -100 (its own first token), t=3 -> -100 (prompt), t=4 -> 1 at pos 1 (1/4): log(1/4)
    # example 2: t=0 -> 0 at pos 0 (1/4): log(1/4); example 3 (padding): nothing
    torch.testing.assert_close(sums, _t(2 * math.log(0.75), math.log(0.25), math.log(0.25), 0.0))
    assert counts.tolist() == [2, 1, 1, 0]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sequence_logps_from_hidden_equal_full_logits_with_gradients(packed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(6, 11, bias=False).double()
    labels = torch.randint(0, 11, (2, 8), generator=g)
    labels[:, :2] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    position_ids = None
    if packed:
        position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1]])
        labels[position_ids == 0] = IGNORE_INDEX
    expected, expected_counts = sequence_logps(head(hidden), labels, position_ids)
    expected_grad = torch.autograd.grad(expected.sum(), hidden)[0]
    for chunk in (1, 3, 4096):
        got, counts = sequence_logps_from_hidden(hidden, head, labels, position_ids, chunk_size=chunk)
        torch.testing.assert_close(got, expected)
        assert counts.tolist() == expected_counts.tolist()
        torch.testing.assert_close(torch.autograd.grad(got.sum(), hidden)[0], expected_grad)
    # padded: row 0 labels 2..7, row 1 labels 2..5; packed: each example's first label is dropped too, and
    # row 1's last example (positions 6-7) is all padding
    assert expected_counts.tolist() == ([2, 3, 4, 0] if packed else [6, 4])


def test_packed_pair_gives_the_padded_log_probs_on_a_model() -> None:
    """Chosen and rejected of a pair in one packed row (per-example attention) = the same two padded rows."""
    prompt, chosen, rejected = [1, 17, 42, 9], [5, 77, 2], [6, 2]
    rows = [prompt + chosen, prompt + rejected]
    labels_rows = [[IGNORE_INDEX] * len(prompt) + r for r in (chosen, rejected)]
    padded_model, packed_model = (tiny_mistral(attn=a, vocab_size=100, seed=3) for a in ("sdpa", "lit_ft_packed"))
    input_ids, attention_mask = pad_rows(rows, pad_token_id=0)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, row in enumerate(labels_rows):
        labels[i, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        padded = sequence_logps(padded_model(input_ids, attention_mask=attention_mask).logits, labels)
        packed_ids = torch.tensor([rows[0] + rows[1]])
        position_ids = torch.tensor([list(range(len(rows[0]))) + list(range(len(rows[1])))])
        logits = packed_model(packed_ids, position_ids=position_ids).logits
        packed = sequence_logps(logits, torch.tensor([labels_rows[0] + labels_rows[1]]), position_ids)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    assert packed[1].tolist() == padded[1].tolist() == [3, 2]


# --------------------------------------------------------------------------------------------------------
# Losses, by hand
# --------------------------------------------------------------------------------------------------------


def test_sigmoid_loss_and_its_label_smoothing() -> None:
    # beta * delta = 0.5 * (2, -2) = (1, -1): -log sigmoid(1) = L1 = 0.3132617, -log sigmoid(-1) = L2 = 1.3132617
    torch.testing.assert_close(sigmoid_loss(_t(2.0, -2.0), beta=0.5), _t(L1, L2))
    # cDPO, eps = 0.1 at z = 1: 0.9 L1 + 0.1 L2 = L1 + 0.1 (L2 - L1) = L1 + 0.1 = 0.4132617
    torch.testing.assert_close(sigmoid_loss(_t(2.0), beta=0.5, label_smoothing=0.1), _t(L1 + 0.1))


def test_robust_loss() -> None:
    # z = 1, eps = 0.1: (0.9 L1 - 0.1 L2) / 0.8 = L1 - 0.1 (L2 - L1) / 0.8 = L1 - 0.125 = 0.1882617
    torch.testing.assert_close(robust_loss(_t(2.0), beta=0.5, label_smoothing=0.1), _t(L1 - 0.125))
    torch.testing.assert_close(robust_loss(_t(2.0), beta=0.5, label_smoothing=0.0), _t(L1))  # eps 0: DPO


def test_hinge_loss() -> None:
    # relu(1 - 0.5 * delta): delta 2 -> 0, delta -2 -> 2, delta 1 -> 0.5
    torch.testing.assert_close(hinge_loss(_t(2.0, -2.0, 1.0), beta=0.5), _t(0.0, 2.0, 0.5))


def test_ipo_loss_is_per_token_normalised() -> None:
    # beta 0.25: target 1 / (2 beta) = 2
    # pair 0: 6 / 3 - (-2) / 2 = 2 + 1 = 3 -> (3 - 2)^2 = 1
    # pair 1: 2 / 4 - 1 / 1 = -0.5 -> (-0.5 - 2)^2 = 6.25
    # pair 2: a zero length counts as 1: 1 / 1 - 0 / 1 = 1 -> (1 - 2)^2 = 1
    got = ipo_loss(_t(6.0, 2.0, 1.0), _t(-2.0, 1.0, 0.0), _t(3, 4, 0), _t(2, 1, 1), beta=0.25)
    torch.testing.assert_close(got, _t(1.0, 6.25, 1.0))


def test_simpo_loss() -> None:
    # beta 2, gamma 1: averages -6 / 3 = -2 and -9 / 3 = -3; z = 2 * (-2 - -3) - 1 = 1 -> L1
    # second pair: -4 / 2 = -2 and -4 / 4 = -1; z = 2 * (-1) - 1 = -3 -> log(1 + e^3) = 3.0485874
    got = simpo_loss(_t(-6.0, -4.0), _t(-9.0, -4.0), _t(3, 2), _t(3, 4), beta=2.0, gamma=1.0)
    torch.testing.assert_close(got, _t(L1, math.log1p(math.exp(3.0))))
    # label smoothing 0.1 as in cDPO: L1 + 0.1
    got = simpo_loss(_t(-6.0), _t(-9.0), _t(3), _t(3), beta=2.0, gamma=1.0, label_smoothing=0.1)
    torch.testing.assert_close(got, _t(L1 + 0.1))


def test_preference_loss_means_pairs_and_gives_rewards_and_trl_metrics() -> None:
    # log-ratios: chosen -3 - -4 = 1 and -2 - -1 = -1; rejected -5 - -4 = -1 and -1 - -2 = 1
    # delta = (2, -2); beta 0.5 -> losses (L1, L2), mean (L1 + L2) / 2 = 0.8132617
    policy_c, policy_r, ref_c, ref_r = _t(-3.0, -2.0), _t(-5.0, -1.0), _t(-4.0, -1.0), _t(-4.0, -2.0)
    out = preference_loss(PreferenceLossSettings(beta=0.5), policy_c, policy_r, ref_c, ref_r)
    torch.testing.assert_close(out.loss, torch.tensor((L1 + L2) / 2, dtype=torch.float64))
    # rewards = beta * log-ratio: chosen (0.5, -0.5), rejected (-0.5, 0.5)
    torch.testing.assert_close(out.chosen_rewards, _t(0.5, -0.5))
    torch.testing.assert_close(out.rejected_rewards, _t(-0.5, 0.5))
    metrics = {k: float(v) for k, v in preference_metrics(out, policy_c, policy_r).items()}
    # accuracy: pair 0 right, pair 1 wrong -> 0.5; margins (1, -1) -> 0; logps: (-3 - 2) / 2, (-5 - 1) / 2
    assert metrics == pytest.approx({"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.5,
                                     "rewards/margins": 0.0, "logps/chosen": -2.5, "logps/rejected": -3.0})


def test_sft_weight_adds_the_chosen_token_nll_over_the_batch_tokens() -> None:
    # two pairs: chosen log-probs -6 over 3 tokens and -2 over 1 token: NLL per token (6 + 2) / 4 = 2
    chosen, rejected, lengths = torch.tensor([-6.0, -2.0]), torch.tensor([-7.0, -1.0]), torch.tensor([3.0, 1.0])
    assert float(sft_loss(chosen, lengths)) == pytest.approx(2.0)
    ref = torch.tensor([-6.0, -2.0]), torch.tensor([-6.0, -2.0])
    plain = preference_loss(PreferenceLossSettings(beta=1.0), chosen, rejected, *ref, lengths, lengths)
    rpo = preference_loss(PreferenceLossSettings(beta=1.0, sft_weight=0.5), chosen, rejected, *ref, lengths, lengths)
    # delta = (0 - (-1), 0 - 1) = (1, -1): mean of softplus(-1) and softplus(1) is (0.3133 + 1.3133) / 2
    assert float(plain.loss) == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2, abs=1e-6)
    assert float(rpo.loss) == pytest.approx(float(plain.loss) + 0.5 * 2.0, abs=1e-6)
    assert torch.equal(rpo.losses, plain.losses)  # the per-pair preference losses are unchanged
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(PreferenceLossSettings(sft_weight=1.0), chosen, rejected, *ref)


def test_simpo_needs_no_reference_and_rewards_the_average_log_prob() -> None:
    settings = PreferenceLossSettings(loss_type="simpo", beta=2.0, simpo_gamma=1.0)
    assert not settings.needs_reference
    out = preference_loss(settings, _t(-6.0), _t(-9.0), chosen_lengths=_t(3), rejected_lengths=_t(3))
    torch.testing.assert_close(out.loss, torch.tensor(L1, dtype=torch.float64))
    # rewards: 2 * -6 / 3 = -4 and 2 * -9 / 3 = -6
    torch.testing.assert_close((out.chosen_rewards, out.rejected_rewards), (_t(-4.0), _t(-6.0)))


def test_missing_reference_or_lengths_is_a_bug_not_a_silent_zero() -> None:
    with pytest.raises(ValueError, match="reference"):
        preference_loss(PreferenceLossSettings(), _t(-1.0), _t(-2.0))
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(PreferenceLossSettings(loss_type="ipo"), _t(-1.0), _t(-2.0), _t(-1.0), _t(-2.0))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"loss_type": "kto"}, "loss_type"),
    ({"beta": 0.0}, "beta"),
    ({"sft_weight": -1.0}, "sft_weight"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
])
def test_bad_settings_are_config_errors_naming_the_setting(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        PreferenceLossSettings(**kwargs)


# --------------------------------------------------------------------------------------------------------
# Equivalence with TRL 1.16 (issue 17, criterion 3): TRL's trainer computes its loss and log-probs; lit_ft
# computes its own log-probs from its own copies of the same models, then its loss
# --------------------------------------------------------------------------------------------------------

PAIRS = {
    "prompt": ["Reverse the word cat:", "Count to three:", "Say hello to Ada"],
    "chosen": [" tac", " one two three", " Hello, Ada! Nice to meet you."],
    "rejected": [" cat backwards maybe", " one", " no"],
}
POLICY_SEED, REFERENCE_SEED = 0, 1  # two different random models, so that log-ratios are not zero


def _sharp_model(seed: int, attn: str = "sdpa"):
    """The tiny random Mistral with its output head scaled x3: its next-token distributions are far from uniform,
    so that policy/reference log-ratios are O(1) per sequence rather than O(0.01) and the losses leave log 2.
    (x3, not more: float32 rounding of the O(50) summed log-probs then stays near 1e-6, well inside 1e-5.)"""
    model = tiny_mistral(attn=attn, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


def _trl(minversion: str = "1.16"):
    return pytest.importorskip("trl", minversion=minversion,
                               reason="trl is not installed: the bench extra (pip install 'trl>=1.16,<2')")


def _padded_and_packed_logps(rows: list[list[int]], label_rows: list[list[int]], seed: int
                             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """lit_ft's summed log-probs and response lengths of ``rows``, padded and packed (all rows in one)."""
    padded_model, packed_model = (_sharp_model(seed, attn) for attn in ("sdpa", "lit_ft_packed"))
    input_ids, attention_mask = pad_rows(rows, pad_token_id=0)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, row in enumerate(label_rows):
        labels[i, : len(row)] = torch.tensor(row)
    packed_ids = torch.tensor([[t for row in rows for t in row]])
    position_ids = torch.tensor([[p for row in rows for p in range(len(row))]])
    packed_labels = torch.tensor([[t for row in label_rows for t in row]])
    with torch.no_grad():
        padded = sequence_logps(padded_model(input_ids, attention_mask=attention_mask).logits, labels)
        packed = sequence_logps(packed_model(packed_ids, position_ids=position_ids).logits, packed_labels,
                                position_ids)
    return [padded, packed]


def _lit_ft_loss(settings: PreferenceLossSettings, rows, label_rows) -> list[tuple[torch.Tensor, dict]]:
    """lit_ft's loss and metrics on ``rows`` ordered [chosen..., rejected...], for the padded and packed layouts."""
    results = []
    references = _padded_and_packed_logps(rows, label_rows, REFERENCE_SEED) if settings.needs_reference else None
    for layout, (logps, lengths) in enumerate(_padded_and_packed_logps(rows, label_rows, POLICY_SEED)):
        (chosen, rejected), (chosen_len, rejected_len) = logps.chunk(2), lengths.chunk(2)
        ref = references[layout][0].chunk(2) if references else (None, None)
        out = preference_loss(settings, chosen, rejected, *ref, chosen_len, rejected_len)
        metrics = {k: float(v) for k, v in preference_metrics(out, chosen, rejected).items()}
        results.append((out.loss, metrics))
    return results


# betas that put beta * delta near 1 on these models (IPO: a target 1 / (2 beta) of 1, so that the float32 loss
# is O(1) and 1e-5 is well above its rounding)
@pytest.mark.parametrize(("loss_type", "beta", "label_smoothing", "sft_weight"), [
    ("sigmoid", 1.0, 0.0, 0.0), ("hinge", 1.0, 0.0, 0.0), ("ipo", 0.5, 0.0, 0.0), ("robust", 1.0, 0.1, 0.0),
    ("sigmoid", 1.0, 0.0, 0.5),  # RPO: TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, 0.5]
])
def test_loss_equals_trl_dpo_trainer(tokenizer, tmp_path, loss_type: str, beta: float,
                                     label_smoothing: float, sft_weight: float) -> None:
    """Every loss_type TRL 1.16's DPOTrainer also has (and its "sft" term): its loss and TRL-named metrics, to
    1e-5."""
    _trl()
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    weights = {"loss_type": [loss_type, "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {
        "loss_type": [loss_type]}
    args = DPOConfig(output_dir=str(tmp_path), **weights, beta=beta, label_smoothing=label_smoothing,
                     per_device_train_batch_size=len(PAIRS["prompt"]), precompute_ref_log_probs=False,
                     use_cpu=True, bf16=False, report_to=[], seed=0)
    trainer = DPOTrainer(model=_sharp_model(POLICY_SEED), ref_model=_sharp_model(REFERENCE_SEED),
                         args=args, train_dataset=Dataset.from_dict(PAIRS), processing_class=tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS["prompt"]))]
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train" if trainer.model.training else "eval"].items()}

    # lit_ft's rows: the prompt and response token ids TRL tokenised, chosen rows first (TRL's order)
    rows, label_rows = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for e in examples:
            rows.append(e["prompt_ids"] + e[side])
            label_rows.append([IGNORE_INDEX] * len(e["prompt_ids"]) + e[side])
    settings = PreferenceLossSettings(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                                      sft_weight=sft_weight)
    for loss, metrics in _lit_ft_loss(settings, rows, label_rows):
        assert abs(float(loss) - float(trl_loss)) < 1e-5, (float(loss), float(trl_loss))
        # to 1e-5, or 1e-6 relative for the summed log-probs (O(100) here: two float32 summation orders)
        assert metrics == pytest.approx({name: trl_metrics[name] for name in metrics}, rel=1e-6, abs=1e-5)
    assert abs(trl_metrics["rewards/margins"]) > 0.01  # the reference differs from the policy: no trivial match


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_trainer(tokenizer, tmp_path, label_smoothing: float) -> None:
    """SimPO is not in TRL 1.16's DPOTrainer; its experimental CPOTrainer has it (loss_type simpo, cpo_alpha 0)."""
    _trl()
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    beta, gamma = 2.0, 1.0
    args = CPOConfig(output_dir=str(tmp_path), loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=gamma,
                     label_smoothing=label_smoothing, per_device_train_batch_size=len(PAIRS["prompt"]),
                     max_length=64, use_cpu=True, bf16=False, report_to=[], remove_unused_columns=False, seed=0)
    trainer = CPOTrainer(model=_sharp_model(POLICY_SEED), args=args, train_dataset=Dataset.from_dict(PAIRS),
                         processing_class=tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS["prompt"]))]
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(examples))

    rows, label_rows = [], []
    for side in ("chosen", "rejected"):
        for e in examples:
            ids, labels = e[f"{side}_input_ids"], e[f"{side}_labels"]
            assert len(ids) == len(labels)
            rows.append(ids)
            label_rows.append(labels)
    settings = PreferenceLossSettings(loss_type="simpo", beta=beta, simpo_gamma=gamma,
                                      label_smoothing=label_smoothing)
    for loss, metrics in _lit_ft_loss(settings, rows, label_rows):
        assert abs(float(loss) - float(trl_loss)) < 1e-5, (float(loss), float(trl_loss))
        rewards = [name for name in metrics if name.startswith("rewards/")]  # CPO logs averaged logps/*
        assert {n: metrics[n] for n in rewards} == pytest.approx({n: trl_metrics[n] for n in rewards}, abs=1e-5)
