"""Attention whose cost stays per example in packed rows: ``attn_implementation: lit_ft_packed``.

Given packed rows (restarting ``position_ids``, no attention mask), transformers' ``sdpa`` backend builds a
block-diagonal ``(B, 1, T, T)`` mask and runs attention over the whole row: the cost is quadratic in the row
length ``T``, every masked-out pair is still computed, and a mask keeps SDPA off its fused grouped-query and
causal-skipping paths. ``lit_ft_packed`` runs causal SDPA on each example's own segment instead, so a row of
examples of lengths ``L_i`` costs ``sum(L_i^2)`` rather than ``T^2``, and attention still never crosses from
one example to another.

Segment boundaries are read from the ``position_ids`` every decoder layer receives (a new example starts
where they restart at 0, as :func:`lit_ft.data.packing.example_lengths_from_position_ids` reads them). They are
computed once per batch, in the first layer, and reused by the others: the layers receive the same tensor.
With ``position_ids`` on a GPU that is one device-to-host copy per forward pass (not one per layer).

Batches with an attention mask (padded batches, generation with a cache) go to transformers' ``sdpa``
unchanged, so the implementation is a drop-in replacement for ``sdpa``.

Sliding-window attention (Mistral-7B-v0.1: 4096) is applied as transformers applies it (``sliding_window_overlay``:
a query sees its own key and the ``window - 1`` keys before it): an example no longer than the window keeps the
fused causal kernel; a longer one gets an explicit banded mask. Masks transformers builds (padding, a cache)
already carry the window.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "lit_ft_packed"


@dataclass(frozen=True)
class Segments:
    """Where the examples of a packed batch lie: ``(row, start, end)`` per example, in row-major order."""

    bounds: tuple[tuple[int, int, int], ...]
    rows: int
    width: int

    @property
    def one_per_row(self) -> bool:
        """True when no row holds more than one example (plain causal attention is then exact)."""
        return len(self.bounds) == self.rows


def segments_from_position_ids(position_ids: torch.Tensor) -> Segments:
    """Example boundaries in (B, T) or (T,) ``position_ids``: an example starts wherever they are 0.

    The first token of a row always starts an example. One host transfer of the (B, T) start flags.
    """
    flat = position_ids.reshape(-1, position_ids.shape[-1])
    starts = (flat == 0).cpu()
    starts[:, 0] = True
    rows, width = starts.shape
    bounds = []
    for row, cols in enumerate(starts.tolist()):
        begin = [i for i, is_start in enumerate(cols) if is_start]
        ends = begin[1:] + [width]
        bounds.extend((row, s, e) for s, e in zip(begin, ends))
    return Segments(tuple(bounds), rows, width)


class _SegmentCache:
    """The segments of the last ``position_ids`` tensor seen, so that the layers after the first reuse them.

    Keyed on the tensor object itself (a weak reference, so the cache never keeps a batch alive) and on its
    version counter (an in-place change invalidates the entry).
    """

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._version = -1
        self._segments: Segments | None = None
        self.computed = 0  # how many times segments were computed (tests check it is once per forward)

    def get(self, position_ids: torch.Tensor) -> Segments:
        if self._ref is not None and self._ref() is position_ids and self._version == position_ids._version:
            return self._segments
        self._segments = segments_from_position_ids(position_ids)
        self._ref, self._version = weakref.ref(position_ids), position_ids._version
        self.computed += 1
        return self._segments


SEGMENT_CACHE = _SegmentCache()


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA per packed example; the transformers attention-function signature.

    ``query`` is (B, H, T, D), ``key``/``value`` are (B, KV, T, D); returns (B, T, H, D) like transformers'
    ``sdpa_attention_forward``, to which anything that is not a packed causal training batch is handed.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = (kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
              or getattr(getattr(module, "config", None), "sliding_window", None))
    causal = getattr(module, "is_causal", True)
    plain = (attention_mask is not None or position_ids is None or not causal
             or query.shape[2] != key.shape[2] or query.shape[2] == 1)
    if plain:
        if attention_mask is None and causal and window is not None and key.shape[2] > window:
            # transformers built no mask (it would carry the window): the banded one, (1, 1, q, kv)
            attention_mask = window_mask(query.shape[2], key.shape[2], window, query.device)[None, None]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    segments = SEGMENT_CACHE.get(position_ids)
    gqa = query.shape[1] != key.shape[1]
    if segments.one_per_row:  # nothing packed: one fused call for the whole batch
        out = _causal_sdpa(query, key, value, dropout, scaling, gqa, window)
        return out.transpose(1, 2).contiguous(), None
    parts = [
        _causal_sdpa(query[row : row + 1, :, start:end], key[row : row + 1, :, start:end],
                     value[row : row + 1, :, start:end], dropout, scaling, gqa, window)
        for row, start, end in segments.bounds
    ]
    batch, heads, width, dim = query.shape
    out = torch.cat(parts, dim=2).view(heads, batch, width, dim)  # (1, H, B*T, D): rows one after another
    return out.permute(1, 2, 0, 3).contiguous(), None


def window_mask(q_length: int, kv_length: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(q_length, kv_length) boolean mask, True where attention is allowed: causal, and a query sees its own key and
    the ``window - 1`` before it (transformers' ``sliding_window_overlay``: kv > q - window). The queries are the
    last ``q_length`` positions of the keys."""
    q = torch.arange(kv_length - q_length, kv_length, device=device)[:, None]
    k = torch.arange(kv_length, device=device)[None, :]
    return (k <= q) & (k > q - window)


def _causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None,
                 gqa: bool, window: int | None) -> torch.Tensor:
    """Causal SDPA over one segment (or whole rows): the fused causal kernel, or a banded mask for a segment
    longer than the sliding window."""
    length = query.shape[2]
    if window is None or length <= window:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=window_mask(length, length, window,
                                          query.device), dropout_p=dropout, scale=scaling, enable_gqa=gqa)


def _packed_mask(*, attention_mask: torch.Tensor | None = None, q_length: int = 0, kv_length: int = 0,
                 **kwargs) -> torch.Tensor | None:
    """The mask for ``lit_ft_packed``: none for full-length causal passes (the segments do the masking), and
    transformers' SDPA mask otherwise (padding masks, a cache)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


def register_packed_attention() -> str:
    """Register ``lit_ft_packed`` with transformers (attention function and mask builder); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    return PACKED_ATTENTION
