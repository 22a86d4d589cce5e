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


# 1024 rows: a chunk's logits then take 1024 x vocab x 6 bytes at most (fp32 log-softmax + its compute-dtype
# copy): 188 MiB for Mistral's 32k vocabulary, where 4096 rows took 4x that; a 1024 x h x vocab matmul still keeps
# a GPU's tensor cores busy (docs/memory.md measures the lever).
DEFAULT_CHUNK_SIZE = 1024


def supervised_token_loss(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over supervised tokens, projecting only those positions through the output head.

    Prompt and padding positions never reach the vocabulary projection, which dominates compute for small
    models and memory for large vocabularies. Supervised positions go through the head in chunks of
    ``chunk_size`` rows so that the ``tokens x vocab`` logits never exist all at once.

    With ``fused`` (and a plain ``nn.Linear`` head, while autograd records), each chunk's gradient is computed in
    the forward pass (:class:`FusedLinearCrossEntropy`), so no chunk's logits or softmax are kept for backward:
    the loss holds one chunk of logits at a time instead of every chunk's.

    Returns ``(loss_sum, num_tokens)``; divide by the number of supervised tokens of the whole optimizer step.
    Equal to ``F.cross_entropy(full_logits[:, :-1], labels[:, 1:], reduction="sum")`` (tested).
    """
    mask, targets = shifted_targets(labels)
    selected = hidden[:, :-1][mask]
    wanted = targets[mask]
    if selected.shape[0] == 0:  # nothing supervised: a zero that still back-propagates
        return selected.sum().float(), mask.sum()
    plain_linear = type(head) is torch.nn.Linear  # a PEFT-wrapped or quantised head takes the generic path
    if fused and plain_linear and torch.is_grad_enabled() and (selected.requires_grad or head.weight.requires_grad):
        return FusedLinearCrossEntropy.apply(selected, head.weight, head.bias, wanted, chunk_size), mask.sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk_size):
        logits = _at_least_fp32(head(selected[start : start + chunk_size]))
        total = total + F.cross_entropy(logits, wanted[start : start + chunk_size], reduction="sum")
    return total, mask.sum()


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32, or float64 when they already are (half-precision softmax loses the loss)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, gradients computed in forward.

    Per chunk of rows: logits in the compute dtype (that of the matmul: bf16 under autocast or with a bf16 head),
    widened to fp32 for the log-sum-exp and the loss, then ``softmax - one_hot`` in place over the fp32 logits,
    narrowed back to the compute dtype for the matmul with the weight that gives the hidden states' gradient (and,
    when the head trains, its transpose times the hidden states gives the weight's, accumulated in fp32). At most
    one chunk's fp32 logits and one compute-dtype copy exist at a time; the hidden states' gradient is kept in
    their own dtype. Backward only scales the stored gradients by the incoming scalar. The FLOPs are those of an
    ordinary forward and backward; the memory is one chunk of logits instead of all of them.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32 or better, like the logits
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if want_bias else None
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(h, weight, bias)
            compute = logits.dtype
            logits = logits.to(accumulate)  # a copy only when the matmul ran narrower; the narrow one is freed
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            logits.sub_(lse[:, None]).exp_()  # softmax, in place
            logits[torch.arange(len(t), device=t.device), t] -= 1.0  # d loss / d logits
            if want_weight:
                grad_weight += logits.T @ h.to(accumulate)
            if want_bias:
                grad_bias += logits.sum(0)
            if want_hidden:  # narrowed (the fp32 copy freed) for the matmul, which autocast would narrow anyway
                grad_hidden[start : start + chunk_size] = logits.to(compute) @ weight
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * scale).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def full_logits_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation on full logits: summed cross-entropy and the supervised-token count."""
    mask, targets = shifted_targets(labels)
    loss = F.cross_entropy(
        _at_least_fp32(logits[:, :-1]).reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
        ignore_index=IGNORE_INDEX,
    )
    return loss, mask.sum()
