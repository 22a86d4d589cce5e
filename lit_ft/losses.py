"""Loss functions shared by the stages: plain functions over tensors, unit-tested against hand-computed values."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets for causal LM: position t predicts ``labels[t + 1]``.

    Returns ``(mask, targets)`` of shape ``(B, T - 1)``: where to read hidden states, and their targets.
    """
    targets = labels[:, 1:]
    return targets != IGNORE_INDEX, targets


def supervised_token_loss(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over supervised tokens, projecting only those positions through the output head.

    Prompt and padding positions never reach the vocabulary projection, which dominates compute for small
    models and memory for large vocabularies. Supervised positions go through the head in chunks of
    ``chunk_size`` rows so that the ``tokens x vocab`` logits never exist all at once.

    Returns ``(loss_sum, num_tokens)``; divide by the number of supervised tokens of the whole optimizer step.
    Equal to ``F.cross_entropy(full_logits[:, :-1], labels[:, 1:], reduction="sum")`` (tested).
    """
    mask, targets = shifted_targets(labels)
    selected = hidden[:, :-1][mask]
    wanted = targets[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk_size):
        logits = head(selected[start : start + chunk_size]).float()
        total = total + F.cross_entropy(logits, wanted[start : start + chunk_size], reduction="sum")
    return total, mask.sum()


def full_logits_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation on full logits: summed cross-entropy and the supervised-token count."""
    mask, targets = shifted_targets(labels)
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
        ignore_index=IGNORE_INDEX,
    )
    return loss, mask.sum()
