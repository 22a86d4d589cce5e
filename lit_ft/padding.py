"""Padding and masks: how rows of token ids become model inputs, shared by the data layer, the stages and RL.

* :func:`pad_rows` stacks rows to one width, padded on the right (training) or the left (generation).
* :func:`position_ids_from_mask` counts real tokens only, so left and right padding give the same positions.
* :func:`last_token_index` finds each row's last real token (a reward model reads its score there).
* :func:`example_lengths_from_position_ids` / :func:`example_lengths_from_attention_mask` give each token the
  length of its own example, in packed and padded batches alike.
"""

from __future__ import annotations

import torch


def round_up(length: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``length`` (multiple <= 1 means no rounding)."""
    return length if multiple <= 1 else -(-length // multiple) * multiple


def pad_rows(rows: list, pad_token_id: int, side: str = "right", multiple: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows stacked to one width (the longest, rounded up to ``multiple``), padded on ``side``.

    Returns ``input_ids`` and ``attention_mask`` (1 at real tokens), both (rows, width) LongTensors.
    """
    width = round_up(max(len(row) for row in rows), multiple)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[i, cols] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, cols] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over each row's real tokens (padding gets 0): right for left and right padding alike."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (mask 1), for right or left padding alike (0 for an empty row)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def example_lengths_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Each token's own example length in a packed batch (same shape as ``position_ids``).

    Examples are delimited by ``position_ids == 0`` (segment id = cumsum(starts) - 1 per row); the first
    token of a row always starts a segment. Works for (T,) and (B, T).
    """
    flat = position_ids.reshape(-1, position_ids.shape[-1])
    starts = flat == 0
    starts[:, 0] = True
    segment = starts.long().cumsum(-1) - 1
    counts = torch.zeros_like(segment).scatter_add_(1, segment, torch.ones_like(segment))
    return counts.gather(1, segment).reshape(position_ids.shape)


def example_lengths_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's example length in a padded batch: the row's real length (at least 1), pads included."""
    lengths = attention_mask.long().sum(-1, keepdim=True).clamp_min(1)
    return lengths.expand_as(attention_mask).clone()
