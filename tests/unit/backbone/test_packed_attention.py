"""``lit_ft_packed`` attention: per-example SDPA on packed rows, the same numbers as transformers' ``sdpa``."""

from __future__ import annotations

import torch

from lit_ft.backbone.packed_attention import (
    SEGMENT_CACHE,
    register_packed_attention,
    segments_from_position_ids,
    window_mask,
)
from tests.tiny_models import tiny_mistral

register_packed_attention()

LENGTHS = [(7, 13, 5), (11, 9)]  # two packed rows; the second is shorter and gets a padding segment


def _packed_batch(vocab: int = 500, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(sum(row) for row in LENGTHS) + 3  # +3: every row ends in padding (its own segment)
    ids = torch.randint(3, vocab, (len(LENGTHS), width), generator=g)
    pos = torch.zeros_like(ids)
    for r, row in enumerate(LENGTHS):
        pos[r] = torch.cat([torch.arange(n) for n in row] + [torch.arange(width - sum(row))])
    return {"input_ids": ids, "position_ids": pos}


def _pair(seed: int = 0):
    packed = tiny_mistral(attn="lit_ft_packed", vocab_size=500, seed=seed)
    reference = tiny_mistral(attn="sdpa", vocab_size=500, seed=seed)
    reference.load_state_dict(packed.state_dict())
    return packed, reference


def test_segments_from_position_ids_by_hand() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    seg = segments_from_position_ids(pos)
    assert seg.bounds == ((0, 0, 3), (0, 3, 5), (0, 5, 9), (1, 0, 6), (1, 6, 9))
    assert (seg.rows, seg.width, seg.one_per_row) == (2, 9, False)
    # A row that does not start at 0 (a continuation) still starts a segment; 1-D position ids are one row.
    assert segments_from_position_ids(torch.tensor([3, 4, 0, 1])).bounds == ((0, 0, 2), (0, 2, 4))
    assert segments_from_position_ids(torch.arange(5).expand(3, 5)).one_per_row


def test_packed_forward_and_gradients_equal_sdpa() -> None:
    packed, reference = _pair()
    packed.train(), reference.train()
    batch = _packed_batch()
    out_p = packed(**batch, use_cache=False).logits
    out_r = reference(**batch, use_cache=False).logits
    torch.testing.assert_close(out_p, out_r, rtol=1e-5, atol=1e-5)
    weights = torch.randn(out_p.shape, generator=torch.Generator().manual_seed(1))
    (out_p * weights).sum().backward()
    (out_r * weights).sum().backward()
    grads_r = dict(reference.named_parameters())
    for name, p in packed.named_parameters():
        torch.testing.assert_close(p.grad, grads_r[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_each_example_equals_running_it_alone() -> None:
    packed, reference = _pair()
    batch = _packed_batch()
    with torch.no_grad():
        logits = packed(**batch, use_cache=False).logits
        worst = 0.0
        for r, row in enumerate(LENGTHS):
            start = 0
            for n in row:
                alone = reference(input_ids=batch["input_ids"][r : r + 1, start : start + n], use_cache=False)
                worst = max(worst, (logits[r, start : start + n] - alone.logits[0]).abs().max().item())
                start += n
    assert worst <= 1e-5


def test_ignoring_segments_would_be_detected(monkeypatch) -> None:
    """Control: attention over whole rows (one segment per row) changes the logits, so the tests above can fail."""
    packed, reference = _pair()
    batch = _packed_batch()
    whole_rows = segments_from_position_ids(torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    monkeypatch.setattr(SEGMENT_CACHE, "get", lambda position_ids: whole_rows)
    with torch.no_grad():
        wrong = packed(**batch, use_cache=False).logits
        right = reference(**batch, use_cache=False).logits
    assert (wrong - right).abs().max().item() > 1e-3


def test_segments_are_computed_once_per_forward_not_per_layer() -> None:
    packed, _ = _pair()
    assert packed.config.num_hidden_layers >= 2
    batch = _packed_batch()
    before = SEGMENT_CACHE.computed
    with torch.no_grad():
        packed(**batch, use_cache=False)
    assert SEGMENT_CACHE.computed == before + 1
    batch["position_ids"] = batch["position_ids"].clone()  # a new batch: computed again
    with torch.no_grad():
        packed(**batch, use_cache=False)
    assert SEGMENT_CACHE.computed == before + 2


def test_padded_batches_and_generation_match_sdpa() -> None:
    """With an attention mask (padding, cached decoding) the implementation is plain sdpa."""
    packed, reference = _pair()
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits)
        kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(packed.generate(ids, attention_mask=mask, **kwargs),
                           reference.generate(ids, attention_mask=mask, **kwargs))


WINDOW = 6  # shorter than every example of LENGTHS but 5


def _windowed(window: int | None = WINDOW) -> dict[str, torch.nn.Module]:
    """The tiny model with a sliding window shorter than its examples, under lit_ft_packed, eager and sdpa, with
    the same weights."""
    from dataclasses import asdict

    from transformers import MistralConfig, MistralForCausalLM

    from tests.tiny_models import TINY

    models = {}
    for attn in ("lit_ft_packed", "eager", "sdpa"):
        torch.manual_seed(0)
        config = MistralConfig(vocab_size=500, tie_word_embeddings=False, sliding_window=window, **asdict(TINY))
        config._attn_implementation = attn
        models[attn] = MistralForCausalLM(config).eval()
    return models


def test_window_mask_by_hand() -> None:
    assert window_mask(4, 4, 2).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert window_mask(1, 5, 3).int().tolist() == [[0, 0, 1, 1, 1]]  # a decoding step sees the last 3 keys


def test_packed_examples_longer_than_the_window_match_transformers() -> None:
    """Packed rows whose examples exceed the window: each example's logits equal transformers' eager result on it
    alone with the window, and logits and gradients equal transformers' sdpa on the same packed rows."""
    models = _windowed()
    batch = _packed_batch()
    packed = models["lit_ft_packed"](**batch, use_cache=False).logits
    with torch.no_grad():
        for r, row in enumerate(LENGTHS):
            start = 0
            for n in row:
                alone = models["eager"](input_ids=batch["input_ids"][r : r + 1, start : start + n], use_cache=False)
                torch.testing.assert_close(packed[r, start : start + n], alone.logits[0], rtol=1e-4, atol=1e-5)
                start += n
    reference = models["sdpa"](**batch, use_cache=False).logits
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
    weights = torch.randn(packed.shape, generator=torch.Generator().manual_seed(1))
    (packed * weights).sum().backward()
    (reference * weights).sum().backward()
    grads = dict(models["sdpa"].named_parameters())
    for name, p in models["lit_ft_packed"].named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_unpacked_rows_padding_and_decoding_apply_the_window() -> None:
    """One example per row (the fused whole-row path), padded rows (transformers' mask) and cached decoding, each
    against transformers' eager attention with the window."""
    models = _windowed()
    ids = torch.randint(3, 500, (2, 15), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        for kwargs in ({"position_ids": torch.arange(15).expand(2, 15)}, {"attention_mask": mask}):
            real = mask.bool() if "attention_mask" in kwargs else torch.ones_like(mask, dtype=torch.bool)
            torch.testing.assert_close(models["lit_ft_packed"](input_ids=ids, use_cache=False, **kwargs).logits[real],
                                       models["eager"](input_ids=ids, use_cache=False, **kwargs).logits[real],
                                       rtol=1e-4, atol=1e-5)  # padding positions attend to nothing: any value
        generate = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(models["lit_ft_packed"].generate(ids, **generate), models["eager"].generate(ids, **generate))


def test_a_missing_window_would_be_detected() -> None:
    """Control: the same weights without the window give other logits on these examples (the tests can fail)."""
    windowed, full = _windowed()["lit_ft_packed"], _windowed(None)["lit_ft_packed"]
    with torch.no_grad():
        batch = _packed_batch()
        assert not torch.allclose(windowed(**batch, use_cache=False).logits, full(**batch, use_cache=False).logits,
                                  atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    """The recomputed forward (same position ids) reuses the segments and reproduces the gradients."""
    packed, reference = _pair()
    packed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed.train(), reference.train()
    batch = _packed_batch()
    packed(**batch, use_cache=False).logits.sum().backward()
    reference(**batch, use_cache=False).logits.sum().backward()
    grads_r = dict(reference.named_parameters())
    for name, p in packed.named_parameters():
        torch.testing.assert_close(p.grad, grads_r[name].grad, rtol=1e-4, atol=1e-5, msg=name)
