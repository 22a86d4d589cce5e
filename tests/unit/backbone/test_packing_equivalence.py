"""Packing never lets attention cross examples: each example's logits inside a packed row equal its logits alone.

Checked for every attention backend the config can select that runs on this machine (eager, sdpa, lit_ft's
per-example ``lit_ft_packed``, flex attention where torch has it, flash_attention_2 where installed and a GPU is
present).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lit_ft.backbone.packed_attention import register_packed_attention
from lit_ft.data.packing import ExampleStore, PackedCollator, PackedDataset
from tests.tiny_models import tiny_mistral

register_packed_attention()  # tiny_mistral sets the implementation on the config: transformers must know it


def _available_backends() -> list:
    backends = ["eager", "sdpa", "lit_ft_packed"]
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        backends.append("flex_attention")
    except ImportError:
        backends.append(pytest.param("flex_attention", marks=pytest.mark.skip(reason="torch has no flex attention")))
    has_fa2 = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    backends.append(
        pytest.param(
            "flash_attention_2",
            marks=pytest.mark.skipif(not has_fa2, reason="flash_attention_2 needs the flash_attn package and a GPU"),
        )
    )
    return backends


@pytest.mark.parametrize("attn", _available_backends())
def test_packed_logits_equal_unpacked(attn: str) -> None:
    model = tiny_mistral(attn=attn, vocab_size=500)
    g = torch.Generator().manual_seed(1)
    lengths = [7, 13, 5, 11]
    examples = [{"input_ids": torch.randint(3, 500, (n,), generator=g).tolist()} for n in lengths]
    for e in examples:
        e["labels"] = list(e["input_ids"])
    # Two rows through the real dataset + collator: the second row is shorter, so it has a padding segment.
    rows = [[0, 1, 2], [3]]
    dataset = PackedDataset(ExampleStore(examples), rows)
    batch = PackedCollator(pad_token_id=0)([dataset[0], dataset[1]])
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] > sum(lengths[3:])
    worst = 0.0
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, row in enumerate(rows):
            offset = 0
            for i in row:
                ids = torch.tensor(examples[i]["input_ids"])
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
                worst = max(worst, (packed[r, offset : offset + len(ids)] - alone).abs().max().item())
                offset += len(ids)
    assert worst <= 1e-4, f"{attn}: packed logits differ from unpacked by {worst:.2e}"


def test_cross_attention_would_be_detected() -> None:
    """Control: without restarting position ids the same row does leak across examples (the test can fail)."""
    model = tiny_mistral(attn="sdpa", vocab_size=500)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, 500, (6,), generator=g), torch.randint(3, 500, (6,), generator=g)
    with torch.no_grad():
        row = model(input_ids=torch.cat([a, b])[None], use_cache=False).logits[0, 6:]
        alone = model(input_ids=b[None], use_cache=False).logits[0]
    assert (row - alone).abs().max().item() > 1e-3
