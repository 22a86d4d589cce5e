"""PPO rollouts: sampling from the policy, and the per-token forward passes over prompt + response.

Prompts arrive left-padded, so that every prompt ends in the same column and generation appends columns.
Responses are right-padded after their EOS. Position ids count real tokens only, in the sampling loop and in the
scoring passes alike, so a token's log-prob does not depend on how much padding its row got.

Sampling is our own loop over a KV cache rather than ``generate``: it draws from a ``torch.Generator`` the PPO
module owns and checkpoints (exact resume), and it applies exactly the temperature that the log-probs use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lit_ft.backbone import decoder_and_head
from lit_ft.padding import position_ids_from_mask

if TYPE_CHECKING:
    from lit_ft.data.formats import Prompt


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches ``top_p`` (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each token
    sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@dataclass
class Samples:
    """Sampled responses: ``tokens`` (B, T) padded after EOS, ``mask`` (B, T) 1 up to and including EOS."""

    tokens: torch.Tensor
    mask: torch.Tensor
    ended_with_eos: torch.Tensor  # (B,) bool

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


@torch.no_grad()
def sample(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           eos_token_id: int, pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, greedy: bool = False) -> Samples:
    """Continue left-padded prompts for up to ``max_new_tokens`` tokens, stopping each row at EOS.

    Draws from softmax(logits / temperature) after top-p filtering, with ``generator``; ``greedy`` takes the
    argmax instead. The model runs with a KV cache and only the last position's logits.
    """
    batch = input_ids.shape[0]
    mask = attention_mask.long()
    positions = position_ids_from_mask(mask)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1].float()
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, alive = [], []
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        if greedy:
            token = logits.argmax(-1)
        else:
            probs = top_p_filter(logits / temperature, top_p).softmax(-1)
            token = torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu"
                                      else probs, 1, generator=generator).squeeze(-1).to(input_ids.device)
        alive.append(~finished)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        finished = finished | (token == eos_token_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position, cache=cache,
                    use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()
        next_position = next_position + 1
    response_mask = torch.stack(alive, dim=1).long()
    return Samples(torch.stack(tokens, dim=1), response_mask, finished)


def response_hidden(model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                    response_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states at the positions that predict each response token: (B, T, d).

    Position ``P - 1 + t`` (P = prompt width) sees the prompt and response tokens before ``t``: the state whose
    logits give token ``t`` its log-prob, and whose value estimates the return from there.
    """
    ids = torch.cat([query_ids, response], dim=1)
    mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    decoder, _ = decoder_and_head(model)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     use_cache=False).last_hidden_state
    start = query_ids.shape[1] - 1
    return hidden[:, start:start + response.shape[1]]


def response_logits(model: nn.Module, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logits over the vocabulary at ``hidden`` (from :func:`response_hidden`), divided by the temperature."""
    _, head = decoder_and_head(model)
    return head(hidden).float() / temperature


@dataclass
class Rollout:
    """One batch of experience; per-token tensors are (B, T) over response tokens."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    texts: list[str]
    prompts: list[Prompt]
    ended_with_eos: torch.Tensor
    score_parts: dict[str, torch.Tensor]
