"""Loss and NEFTune functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_ft.backbone.neftune import NEFTune, neftune_noise
from lit_ft.losses.lm import IGNORE_INDEX, full_logits_token_loss, supervised_token_loss
from lit_ft.stages.schedules import WarmupCosine
from tests.tiny_models import tiny_backbone


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chunked"])
def test_supervised_only_loss_equals_full_logits_loss(fused: bool) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).double()
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[:, :4] = IGNORE_INDEX  # prompts
    labels[2, 6:] = IGNORE_INDEX  # padding
    expected, n_expected = full_logits_token_loss(head(hidden), labels)
    for chunk in (1, 3, 4096):
        got, n = supervised_token_loss(hidden, head, labels, chunk_size=chunk, fused=fused)
        assert n == n_expected == 2 * 5 + 2  # rows 0-1: positions 4..8; row 2: 4..5
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chunked"])
@pytest.mark.parametrize("train_head", [False, True], ids=["frozen_head", "trained_head"])
def test_supervised_loss_gradients_match_full_logits(fused: bool, train_head: bool) -> None:
    """Gradients of the hidden states and (when it trains) of the head's weight and bias, scaled by a non-unit
    upstream gradient, against autograd through the full logits."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=True).double().requires_grad_(train_head)
    labels = torch.randint(0, 30, (2, 11), generator=g)
    labels[0, :5] = IGNORE_INDEX
    labels[1, 8:] = IGNORE_INDEX
    got, _ = supervised_token_loss(hidden, head, labels, chunk_size=4, fused=fused)
    (got * 0.37).backward()
    mine = [hidden.grad.clone()] + ([head.weight.grad.clone(), head.bias.grad.clone()] if train_head else [])
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    (full_logits_token_loss(head(hidden), labels)[0] * 0.37).backward()
    reference = [hidden.grad] + ([head.weight.grad, head.bias.grad] if train_head else [])
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fused_loss_in_the_compute_dtype_agrees_with_the_fp32_path() -> None:
    """The lean 4-bit preparation hands the fused loss bf16 hidden states and a bf16 head under autocast; PEFT's
    preparation handed it fp32 ones and 4096-row chunks (autocast ran the matmuls in bf16 all the same). The loss,
    accumulated in fp32 either way, and the hidden states' gradient agree; both stay within bf16 rounding of an
    fp64 reference."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 300, 64, generator=g)
    head = torch.nn.Linear(64, 700, bias=False)
    head.weight.data = torch.randn(700, 64, generator=g) * 0.2
    labels = torch.randint(0, 700, (2, 300), generator=g)
    labels[:, :50] = IGNORE_INDEX

    def run(h: torch.Tensor, w: torch.nn.Linear, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = h.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = supervised_token_loss(h, w, labels, chunk_size=chunk)
        (loss * 0.01).backward()
        return loss, h.grad

    old_loss, old_grad = run(hidden, head, 4096)
    lean_head = torch.nn.Linear(64, 700, bias=False).to(torch.bfloat16)
    lean_head.weight.data = head.weight.data.to(torch.bfloat16)
    new_loss, new_grad = run(hidden.to(torch.bfloat16), lean_head, 64)
    assert old_loss.dtype == new_loss.dtype == torch.float32 and new_grad.dtype == torch.bfloat16
    torch.testing.assert_close(new_loss, old_loss, rtol=1e-6, atol=1e-4)
    # the same bf16 matmul; the lean path stores (and scales) the gradient in bf16: within one bf16 rounding
    torch.testing.assert_close(new_grad.float(), old_grad, rtol=2**-8, atol=1e-8)
    exact, _ = full_logits_token_loss(head.double()(hidden.double()), labels)
    assert abs(new_loss.item() - exact.item()) / exact.item() < 5e-3


def test_module_token_loss_equals_the_models_own_logits() -> None:
    """Through the real model: CausalLM.token_loss (decoder + supervised rows through the head) gives the loss and
    the LoRA gradients of cross-entropy on the full logits of the model's own forward, on a packed batch."""
    from lit_ft.stages.causal_lm import CausalLM

    module = CausalLM(backbone=tiny_backbone(attn="lit_ft_packed"))
    module.configure_model()
    g = torch.Generator().manual_seed(5)
    for name, p in module.model.named_parameters():  # B starts at zero in PEFT: give every LoRA matrix a gradient
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    ids = torch.randint(3, 32000, (2, 24), generator=g)
    position_ids = torch.tensor([list(range(10)) + list(range(14)), list(range(7)) + list(range(17))])
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[position_ids == 0] = IGNORE_INDEX
    batch = {"input_ids": ids, "position_ids": position_ids, "labels": labels}
    loss, n = module.token_loss(batch)
    loss.backward()
    mine = {k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None}
    module.model.zero_grad(set_to_none=True)
    logits = module.model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    expected, n_expected = full_logits_token_loss(logits, labels)
    expected.backward()
    assert int(n) == int(n_expected) > 0 and len(mine) > 4
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    for k, p in module.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(mine[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_no_supervised_token_gives_a_zero_that_backpropagates() -> None:
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    loss, n = supervised_token_loss(hidden, torch.nn.Linear(8, 20), torch.full((1, 5), IGNORE_INDEX))
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_supervised_loss_hand_computed() -> None:
    """Two positions, uniform logits over 4 classes except one: the sum is computed by hand."""
    head = torch.nn.Identity()
    hidden = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])  # position 0 predicts class 1, position 1 predicts class 0
    loss, n = supervised_token_loss(hidden, head, labels)
    expected = math.log(4) + (math.log(math.exp(2) + 3) - 2)
    assert n == 2
    assert abs(loss.item() - expected) < 1e-6


def test_neftune_noise_scales_with_each_examples_own_length() -> None:
    d, alpha = 64, 5.0
    embeds = torch.zeros(1, 12, d)
    lengths = torch.tensor([[4] * 4 + [8] * 8])  # two packed examples of 4 and 8 tokens
    noise = neftune_noise(embeds, lengths, alpha, generator=torch.Generator().manual_seed(0))
    # Uniform in [-s, s]: max |noise| approaches s, and no value exceeds it.
    bound_short, bound_long = alpha / math.sqrt(4 * d), alpha / math.sqrt(8 * d)
    assert noise[0, :4].abs().max() <= bound_short + 1e-7
    assert noise[0, 4:].abs().max() <= bound_long + 1e-7
    assert noise[0, :4].abs().max() > 0.9 * bound_short
    assert noise[0, 4:].abs().max() > 0.9 * bound_long
    # The row length (12) would give a smaller bound for the short example: ours exceeds it.
    assert noise[0, :4].abs().max() > alpha / math.sqrt(12 * d)
    # Variance of U(-s, s) is s^2 / 3.
    big = neftune_noise(torch.zeros(1, 2, 20000), torch.tensor([[4, 4]]), alpha, torch.Generator().manual_seed(1))
    expected_var = (alpha / math.sqrt(4 * 20000)) ** 2 / 3
    assert abs(big.var().item() - expected_var) / expected_var < 0.05


def test_neftune_hook_only_in_training_and_only_when_lengths_set() -> None:
    emb = torch.nn.Embedding(10, 16)
    hook = NEFTune(alpha=5.0).attach(emb)
    ids = torch.arange(6)[None]
    clean = F.embedding(ids, emb.weight)
    emb.train()
    torch.testing.assert_close(emb(ids), clean)  # no lengths given: untouched
    hook.lengths = torch.full((1, 6), 6)
    assert not torch.allclose(emb(ids), clean)
    assert hook.lengths is None  # consumed by one forward
    emb.eval()
    hook.lengths = torch.full((1, 6), 6)
    torch.testing.assert_close(emb(ids), clean)
    hook.detach()


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, warmup_steps=2, total_steps=None)
    sched.set_total_steps(10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1 / 3 and lrs[1] == 2 / 3 and lrs[2] == 1.0
    assert abs(lrs[6] - 0.5 * (1 + math.cos(math.pi * 4 / 8))) < 1e-9
    assert lrs == sorted(lrs[:3]) + sorted(lrs[3:], reverse=True)
