"""The rollout sampler: inverse-CDF draws, shared prefill against separate prefills, the preallocated and
static caches against the dynamic one and ``generate``, per-row EOS stopping, left padding, exact resume;
the rollout records."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lit_ft.padding import position_ids_from_mask
from lit_ft.rl.kv_cache import new_cache
from lit_ft.rl.rollout import GroupRollout, inverse_cdf_draw, sample, sampling_weights_, top_p_filter
from tests.tiny_models import tiny_mistral

EOS, PAD, VOCAB, NEW = 2, 0, 128, 8
PROMPT_LENGTHS = (3, 7, 5)  # left-padded to 7


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The tiny Mistral on a 128-token vocabulary, its output sharpened (x10) and EOS favoured (+3), so that rows
    end at different steps, greedy and sampled alike."""
    model = tiny_mistral(vocab_size=VOCAB)
    head = nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * 10)
        head.bias.zero_()
        head.bias[EOS] = 3.0
    model.lm_head = head
    return model.to(dtype)


def _prompts(extra_padding: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    width = max(PROMPT_LENGTHS) + extra_padding
    ids = torch.full((len(PROMPT_LENGTHS), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENGTHS):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the draw
def test_inverse_cdf_draw_by_hand() -> None:
    weights = torch.tensor([[1.0, 0.0, 3.0]])  # cumulative 1, 1, 4; the target is 4u; block 2 pads to 4 entries
    for u, token in ((0.0, 0), (0.2, 0), (0.25, 2), (0.9, 2)):  # 0.8 < 1 -> 0; 1.0 is not < C[1] = 1 -> skip 1
        assert inverse_cdf_draw(weights, torch.tensor([u], dtype=torch.float64), block=2).item() == token


def test_inverse_cdf_draw_gives_each_token_its_share() -> None:
    # 400 evenly spaced uniforms over weights summing to 4: exactly 100 draws per unit of weight, across blocks of 4
    weights = torch.tensor([0.5, 0.0, 0.0, 1.5, 1.0, 0.0, 0.0, 0.0, 1.0]).expand(400, -1).contiguous()
    uniforms = (torch.arange(400, dtype=torch.float64) + 0.5) / 400
    counts = torch.bincount(inverse_cdf_draw(weights, uniforms, block=4), minlength=9)
    assert counts.tolist() == [50, 0, 0, 150, 100, 0, 0, 0, 100]


def test_inverse_cdf_draw_never_picks_a_zero_weight_past_the_end() -> None:
    # the largest uniform below 1, zero weights after the last positive one (in its block and in later blocks)
    almost_one = torch.tensor([1.0 - 2.0**-53], dtype=torch.float64)
    assert inverse_cdf_draw(torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0]]), almost_one, block=2).item() == 1
    assert inverse_cdf_draw(torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0]]), almost_one, block=4).item() == 1


def test_inverse_cdf_draw_with_a_vocabulary_that_is_not_a_multiple_of_the_block() -> None:
    # 7 entries in blocks of 3: two full blocks and a tail of one; a vocabulary smaller than a block is one block
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0]).expand(8, -1).contiguous()
    uniforms = (torch.arange(8, dtype=torch.float64) + 0.5) / 8
    assert inverse_cdf_draw(weights, uniforms, block=3).tolist() == [0, 0, 2, 2, 6, 6, 6, 6]
    assert inverse_cdf_draw(weights, uniforms, block=128).tolist() == [0, 0, 2, 2, 6, 6, 6, 6]


def test_sampling_weights_are_the_tempered_softmax() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0], [50.0, 49.0, 0.0, 0.0]])
    for temperature in (1.0, 0.7):
        weights = sampling_weights_(logits.clone(), temperature)
        assert_close(weights / weights.sum(-1, keepdim=True), (logits / temperature).softmax(-1))
        assert weights.amax(-1).tolist() == [1.0, 1.0]  # no overflow: the largest weight is exp(0)
    nucleus = sampling_weights_(logits.clone(), 0.7, top_p=0.6)
    assert torch.equal(nucleus > 0, torch.isfinite(top_p_filter(logits / 0.7, 0.6)))
    assert torch.equal(sampling_weights_(logits.half(), 0.7), sampling_weights_(logits.clone(), 0.7))


# ------------------------------------------------------------------------- shared prefill (issue 18, item 4)
@pytest.mark.parametrize("cache", ["preallocated", "static", "dynamic"])
def test_shared_prefill_gives_the_same_samples_as_separate_prefills(cache: str) -> None:
    """"Same": identical tokens, masks and EOS flags, given the same generator state, between ``num_samples=G``
    (each prompt prefilled once, its cache repeated G times) and every prompt given G times
    (``repeat_interleave``). Both draw the same (steps, rows) uniforms, row b * G + g for sample g of prompt b.
    float64, so that kernels rounding differently for different batch shapes (float32 matmuls do, for a few rows)
    cannot move a draw across a token boundary."""
    model, (ids, mask), G = _model(torch.float64), _prompts(), 4
    lengths = []
    for seed in range(3 if cache == "preallocated" else 1):
        shared = sample(model, ids, mask, NEW, EOS, PAD, 1.0, generator=_gen(seed), num_samples=G, cache=cache)
        separate = sample(model, ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), NEW, EOS, PAD, 1.0,
                          generator=_gen(seed), cache=cache)
        assert torch.equal(shared.tokens, separate.tokens)
        assert torch.equal(shared.mask, separate.mask)
        assert torch.equal(shared.ended_with_eos, separate.ended_with_eos)
        lengths += shared.lengths.tolist()
        # not trivially equal: the G samples of a prompt differ from each other
        assert all(len({tuple(r) for r in group.tolist()}) > 1 for group in shared.tokens.view(3, G, -1))
    assert min(lengths) < NEW and max(lengths) == NEW  # some rows ended early, some ran out of tokens


# --------------------------------------------------------------------------------- the cache, greedy tokens
def test_preallocated_cache_gives_the_dynamic_cache_logits_to_the_bit() -> None:
    model, (ids, mask) = _model(), _prompts()
    width, steps = ids.shape[1], 4
    full_mask = torch.cat([mask, torch.ones(len(ids), steps, dtype=torch.long)], dim=1)
    logits = {}
    with torch.no_grad():
        for kind in ("preallocated", "dynamic"):
            kv, position = new_cache(model, kind, width + steps), position_ids_from_mask(mask)
            out = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=kv, use_cache=True)
            rows, position = [out.logits[:, -1]], position[:, -1:] + 1
            for step in range(steps - 1):
                out = model(input_ids=rows[-1].argmax(-1, keepdim=True), attention_mask=full_mask[:, :width + step + 1],
                            position_ids=position, cache=kv, use_cache=True)
                rows.append(out.logits[:, -1])
                position = position + 1
            logits[kind] = torch.stack(rows)
            assert kv.get_seq_length() == width + steps - 1
    assert torch.equal(logits["preallocated"], logits["dynamic"])
    with pytest.raises(ValueError, match="holds 3 columns"):
        model(input_ids=ids, attention_mask=mask, cache=new_cache(model, "preallocated", 3), use_cache=True)


@pytest.mark.parametrize("cache", ["preallocated", "static"])
def test_preallocated_caches_give_the_greedy_tokens_of_the_dynamic_cache_and_of_generate(cache: str) -> None:
    model, (ids, mask) = _model(), _prompts()
    fixed = sample(model, ids, mask, NEW, EOS, PAD, greedy=True, cache=cache)
    dynamic = sample(model, ids, mask, NEW, EOS, PAD, greedy=True, cache="dynamic")
    assert torch.equal(fixed.tokens, dynamic.tokens) and torch.equal(fixed.mask, dynamic.mask)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                               eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    for row, n in enumerate(fixed.lengths.tolist()):
        assert fixed.tokens[row, :n].tolist() == reference[row, :n].tolist()
    assert len(set(fixed.lengths.tolist())) > 1  # rows ended at different steps
    # shared prefill, greedy: every sample of a prompt is that prompt's greedy answer
    shared = sample(model, ids, mask, NEW, EOS, PAD, greedy=True, num_samples=2, cache=cache)
    assert torch.equal(shared.tokens, fixed.tokens.repeat_interleave(2, 0))


def test_left_padding_does_not_change_the_samples() -> None:
    """Positions count real tokens only: three more padding columns give the same draws the same tokens."""
    model = _model(torch.float64)
    tight = sample(model, *_prompts(), NEW, EOS, PAD, 1.0, generator=_gen(5), num_samples=3)
    padded = sample(model, *_prompts(extra_padding=3), NEW, EOS, PAD, 1.0, generator=_gen(5), num_samples=3)
    assert torch.equal(tight.tokens, padded.tokens) and torch.equal(tight.mask, padded.mask)


# ------------------------------------------------------------------------------------------------- EOS
def test_each_row_stops_at_its_own_eos() -> None:
    model, (ids, mask) = _model(), _prompts()
    out = sample(model, ids, mask, NEW, EOS, PAD, 1.0, generator=_gen(0), num_samples=4)
    assert out.tokens.shape[1] == int(out.lengths.max())  # cut to the longest response
    for tokens, row_mask, ended in zip(out.tokens.tolist(), out.mask.tolist(), out.ended_with_eos.tolist()):
        n = sum(row_mask)
        assert row_mask == [1] * n + [0] * (len(row_mask) - n)
        assert tokens[n:] == [PAD] * (len(tokens) - n)  # padding after the end
        assert ended == (EOS in tokens[:n])
        if ended:
            assert tokens.index(EOS) == n - 1  # the EOS is the last real token, and the first EOS
        else:
            assert n == NEW
    assert 0 < int(out.ended_with_eos.sum()) < len(out.ended_with_eos)


def test_the_loop_stops_when_every_row_has_ended() -> None:
    model, (ids, mask) = _model(), _prompts()
    with torch.no_grad():
        model.lm_head.bias[EOS] = 100.0  # every row's first token is EOS
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    out = sample(model, ids, mask, NEW, EOS, PAD, 1.0, generator=_gen(0), num_samples=2)
    assert out.tokens.tolist() == [[EOS]] * 6 and bool(out.ended_with_eos.all())
    assert len(calls) == 1  # the prefill only: no step after the last EOS


# ------------------------------------------------------------------------------------------- exact resume
def test_samples_are_a_function_of_the_generator_state() -> None:
    model, (ids, mask) = _model(), _prompts()
    generator = _gen(7)
    state = generator.get_state()
    first = sample(model, ids, mask, NEW, EOS, PAD, 0.7, generator=generator, num_samples=2)
    after = generator.get_state()
    generator.set_state(state)
    again = sample(model, ids, mask, NEW, EOS, PAD, 0.7, generator=generator, num_samples=2)
    assert torch.equal(first.tokens, again.tokens)
    # a call consumes steps x rows uniforms however early its rows end, so the next draws do not depend on them
    reference = _gen(7)
    torch.rand((NEW, 6), generator=reference, dtype=torch.float64)
    assert torch.equal(reference.get_state(), after)
    assert not torch.equal(first.tokens, sample(model, ids, mask, NEW, EOS, PAD, 0.7, generator=_gen(8),
                                                num_samples=2).tokens)


def test_no_new_tokens_gives_empty_samples() -> None:
    out = sample(_model(), *_prompts(), 0, EOS, PAD, generator=_gen(0), num_samples=2)
    assert out.tokens.shape == (6, 0) and out.mask.shape == (6, 0) and not out.ended_with_eos.any()


# ------------------------------------------------------------------------------------------------ records
def test_group_rollout_checks_its_rows() -> None:
    rows = torch.zeros(6, 2)

    def record(group_size: int) -> GroupRollout:
        return GroupRollout(rows, rows, rows, rows, rows, None, torch.zeros(6), {}, torch.zeros(6),
                            torch.zeros(6, dtype=torch.bool), [""] * 6, [None, None, None], group_size)

    assert record(2).num_groups == 3
    with pytest.raises(ValueError, match="3 prompts x 4 samples"):
        record(4)
