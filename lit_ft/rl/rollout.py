"""Rollouts: sampling from the policy, the per-token forward passes over prompt + response, and the records of
experience that PPO and the group-relative methods (GRPO, RLOO) learn from.

Prompts arrive left-padded, so that every prompt ends in the same column and generation appends columns.
Responses are right-padded after their EOS. Position ids count real tokens only, in the sampling loop and in the
scoring passes alike, so a token's log-prob does not depend on how much padding its row got.

Sampling is our own loop over a KV cache rather than ``generate``: it draws from a ``torch.Generator`` the caller
owns and checkpoints (exact resume), and it applies exactly the temperature that the log-probs use. What makes
it fast (each measured in docs/rollouts.md):

* one uniform number per row and token, all drawn before the loop in one call, turned into a token by inverse-CDF
  sampling (:func:`inverse_cdf_draw`): no per-token host copies, and 1 random number per token instead of one per
  vocabulary entry (``torch.multinomial`` draws an exponential per entry and checks its input with two syncs);
* a preallocated KV cache (:mod:`lit_ft.rl.kv_cache`) and one attention mask: nothing is reallocated per
  token;
* G samples of one prompt share its prefill: the prompt runs once, its cache is repeated G times;
* whether every row has ended is asked every ``stop_check_every`` tokens on accelerators (a sync), every token on
  the CPU (where it is free); the tokens past the last EOS are trimmed, so the result does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lit_ft.backbone import decoder_and_head
from lit_ft.padding import position_ids_from_mask
from lit_ft.rl.kv_cache import SamplerCache, new_cache

if TYPE_CHECKING:
    from lit_ft.data.formats import Prompt


@dataclass(frozen=True)
class SamplingSettings:
    """How an RL stage samples its responses (``model.sampling`` of PPO and GRPO).

    Args:
        temperature: the policy samples from softmax(logits / temperature), and its log-probs (the ratio, the KL)
            use the same division, so the policy gradient is the sampled distribution's (1.0: the model's own
            distribution; the embedded configs use 0.7, since 1.0 samples junk from a tiny model's long tail).
        top_p: nucleus sampling threshold (1.0: off, as TRL's PPO and GRPO defaults).
        max_new_tokens: the longest response, also Dr. GRPO's length constant; a response cut here has no EOS
            (16: short answers, cheap to sample on a CPU; the embedded configs set 20, the 7B recipes 128).
        missing_eos_penalty: subtracted from the score of a response that ends without EOS, so that the policy
            learns to stop (None: off; TRL's ``missing_eos_penalty``, off by default there too).
        seed: seed of the sampling and minibatch generator, checkpointed for exact resume (None: the global seed
            of ``seed_everything``, so that one seed sets the whole run).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    missing_eos_penalty: float | None = None
    seed: int | None = None

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with ``seed`` (the global seed when None)."""
        return torch.Generator().manual_seed(torch.initial_seed() if self.seed is None else self.seed)


torch.serialization.add_safe_globals([SamplingSettings])  # modules built in Python keep it in their checkpoints

# Vocabulary entries per block of the two-level inverse CDF. 128: about sqrt(32k), so the per-block sums and the
# one block's cumulative sum are both small; 32000 (Mistral) and 128256 (Llama 3) are multiples of it.
CDF_BLOCK = 128


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches ``top_p`` (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each token
    sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sampling_weights_(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Unnormalised probabilities of softmax(logits / temperature) after top-p filtering: ``(N, V)`` float32.

    ``exp((logits - max) / temperature)``: the softmax without its division, which sampling does not need; the
    largest entry is 1, so no row is all zero. Overwrites float32 ``logits`` (the trailing underscore): on the CPU
    a new (N, V) tensor per token costs more in page faults than the arithmetic.
    """
    logits = logits.float()
    if top_p < 1.0:
        logits, temperature = top_p_filter(logits / temperature, top_p), 1.0
    logits = logits.sub_(logits.amax(-1, keepdim=True))
    return (logits if temperature == 1.0 else logits.div_(temperature)).exp_()


def inverse_cdf_draw(weights: torch.Tensor, uniforms: torch.Tensor, block: int = CDF_BLOCK) -> torch.Tensor:
    """One token per row, drawn with probability ``weights / weights.sum(-1)`` by inverse-CDF sampling.

    ``weights`` ``(N, V)`` are non-negative with a positive sum per row; ``uniforms`` ``(N,)`` lie in [0, 1).
    Row ``n`` gets the token ``i`` with ``C[i-1] <= u[n] * C[V-1] < C[i]``, C the cumulative sum of its weights:
    a pure function of ``u``, so the same numbers give the same tokens however the rows are batched.

    Two levels, so no step runs a float64 pass over the whole vocabulary: per-block sums (float32, one pass),
    their cumulative sum in float64 picks the block, then the block's own cumulative sum picks the token. A token
    of weight 0 is never picked: where rounding puts the target past a block's last token, the last token of
    positive weight is taken instead. A vocabulary that is not a multiple of ``block`` ends in a shorter block,
    padded with zeros on its own (the weights are not copied).
    """
    rows, vocab = weights.shape
    block = min(block, vocab)
    full, rest = divmod(vocab, block)
    blocks = weights[:, :full * block].unflatten(-1, (full, block))  # a view: (N, full, block)
    block_sums = blocks.sum(-1)  # (N, blocks), float32
    if rest:
        tail = F.pad(weights[:, full * block:], (0, block - rest))  # (N, block)
        block_sums = torch.cat([block_sums, tail.sum(-1, keepdim=True)], dim=1)
    block_cdf = block_sums.double().cumsum(-1)
    target = (uniforms.double() * block_cdf[:, -1]).unsqueeze(1)  # (N, 1)
    last_block = ((block_sums > 0) * torch.arange(block_sums.shape[1], device=weights.device)).argmax(-1, True)
    chosen = torch.minimum(torch.searchsorted(block_cdf, target, right=True), last_block)  # (N, 1)
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, chosen.clamp(max=full - 1).unsqueeze(-1).expand(rows, 1, block)).squeeze(1)
    if rest:
        inner = torch.where(chosen == full, tail, inner)
    inner_cdf = inner.double().cumsum(-1)
    last_inner = ((inner > 0) * torch.arange(block, device=weights.device)).argmax(-1, keepdim=True)
    offset = torch.minimum(torch.searchsorted(inner_cdf, target - before, right=True), last_inner)
    return (chosen * block + offset).squeeze(1)


@dataclass
class Samples:
    """Sampled responses, N rows (prompts x samples per prompt, prompt-major) by T = the longest response.

    Attributes:
        tokens: ``(N, T)`` long, the response tokens; ``pad_token_id`` after each row's EOS.
        mask: ``(N, T)`` long, 1 at real tokens up to and including the EOS, 0 after it.
        ended_with_eos: ``(N,)`` bool, whether the row ended with EOS (False: it ran out of ``max_new_tokens``).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    ended_with_eos: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """``(N,)`` tokens per response, the EOS included."""
        return self.mask.sum(-1)


def sampling_state(generator: torch.Generator) -> dict:
    """What makes an RL stage's resume exact, for its checkpoint: the sampling generator (samples, minibatch order)
    and the process RNG states (dropout, anything else drawn from torch's default generators)."""
    return {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_sampling_state(generator: torch.Generator, state: dict) -> None:
    """Put back what :func:`sampling_state` saved."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def draw_uniforms(generator: torch.Generator | None, steps: int, rows: int, device: torch.device) -> torch.Tensor:
    """The ``(steps, rows)`` float64 uniforms one call of :func:`sample` consumes, drawn at once.

    Drawn on the generator's device (the CPU generator a module checkpoints, for exact resume) in one call, then
    moved in one copy. A call consumes ``steps x rows`` numbers however early its rows end, so what the generator
    yields next does not depend on the responses.
    """
    source = generator.device if generator is not None else device
    return torch.rand((steps, rows), generator=generator, dtype=torch.float64, device=source).to(device)


@torch.no_grad()
def sample(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           eos_token_id: int, pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, greedy: bool = False, num_samples: int = 1,
           cache: SamplerCache = "preallocated", stop_check_every: int = 8) -> Samples:
    """Continue left-padded prompts for up to ``max_new_tokens`` tokens, ``num_samples`` times each, stopping
    each row at EOS.

    Draws from softmax(logits / temperature) after top-p filtering, by :func:`inverse_cdf_draw` with the uniforms
    of :func:`draw_uniforms` (``generator``); ``greedy`` takes the argmax and draws nothing. Rows of the result are
    prompt-major: row ``b * num_samples + g`` is sample ``g`` of prompt ``b``. Each prompt is prefilled once and
    its cache repeated ``num_samples`` times, so the result is the same as passing every prompt ``num_samples``
    times (``input_ids.repeat_interleave(num_samples, 0)``) under the same generator state, up to the rounding of
    kernels that see a different batch shape (tests/unit/rl/test_rollout.py).

    Args:
        cache: "preallocated" (:class:`lit_ft.rl.kv_cache.PreallocatedLayer`: storage for prompt +
            ``max_new_tokens`` allocated once, attention over the filled columns; the default, see
            docs/rollouts.md), "static" (transformers' ``StaticCache``, attention over every column) or "dynamic"
            (grows by one column per token, as ``generate`` does by default).
        stop_check_every: on accelerators, tokens between the checks whether every row has ended (each check is
            a device-to-host sync; 8: at most 7 wasted steps after the last EOS). The CPU checks every token.
    """
    batch, width = input_ids.shape
    rows, device = batch * num_samples, input_ids.device
    if max_new_tokens <= 0:
        empty = torch.zeros(rows, 0, dtype=torch.long, device=device)
        return Samples(empty, empty.clone(), torch.zeros(rows, dtype=torch.bool, device=device))
    uniforms = None if greedy else draw_uniforms(generator, max_new_tokens, rows, device)
    prompt_mask = attention_mask.long()
    positions = position_ids_from_mask(prompt_mask)
    # One mask for the whole loop, sliced to the columns seen so far (the static cache takes all of them: its
    # causal mask hides the columns not generated yet).
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], dim=1)
    kv = new_cache(model, cache, width + max_new_tokens)
    out = model(input_ids=input_ids, attention_mask=full_mask if cache == "static" else prompt_mask,
                position_ids=positions, cache=kv, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]
    next_position = positions[:, -1:] + 1
    if num_samples > 1:
        index = torch.arange(batch, device=device).repeat_interleave(num_samples)
        kv.reorder_cache(index)
        logits, full_mask, next_position = logits[index], full_mask[index], next_position[index]
    check_every = 1 if device.type == "cpu" else max(1, stop_check_every)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    alive = torch.zeros((rows, max_new_tokens), dtype=torch.bool, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if greedy:
            token = logits.argmax(-1)
        else:
            token = inverse_cdf_draw(sampling_weights_(logits, temperature, top_p), uniforms[step])
        alive[:, step] = ~finished
        token = token.masked_fill_(finished, pad_token_id)
        tokens[:, step] = token
        finished |= token == eos_token_id
        if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(finished.all())):
            break
        step_mask = full_mask if cache == "static" else full_mask[:, :width + step + 1]
        out = model(input_ids=token[:, None], attention_mask=step_mask, position_ids=next_position, cache=kv,
                    use_cache=True)
        logits = out.logits[:, -1]
        next_position = next_position + 1
    longest = int(alive.sum(-1).max())  # the one sync at the end; steps run past the last EOS are cut off
    return Samples(tokens[:, :longest].contiguous(), alive[:, :longest].long(), finished)


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
    """One batch of PPO experience: B prompts, one response each, T = the longest response.

    Attributes:
        query: ``(B, P)`` long, prompt ids, left-padded to the batch's longest prompt P.
        query_mask: ``(B, P)`` long, 1 at real prompt tokens.
        response: ``(B, T)`` long, sampled response ids, right-padded after EOS (:class:`Samples` ``tokens``).
        mask: ``(B, T)`` long, 1 at real response tokens up to and including EOS.
        logprobs: ``(B, T)`` float32, the policy's log-probs of the response tokens at sampling time.
        ref_logprobs: ``(B, T)`` float32, the reference model's log-probs of the same tokens.
        values: ``(B, T)`` float32, the value head's estimates at the positions that predict each token.
        advantages: ``(B, T)`` float32, whitened GAE advantages (0 at padding).
        returns: ``(B, T)`` float32, advantages + values: the value head's regression targets.
        scores: ``(B,)`` float32, the sequence reward (weighted reward model + programmatic rewards, EOS penalty).
        kl: ``(B, T)`` float32, the per-token KL estimate to the reference (0 at padding).
        texts: B decoded responses.
        prompts: the B prompts the rows answer.
        ended_with_eos: ``(B,)`` bool, whether the response ended with EOS.
        score_parts: each reward's ``(B,)`` part of ``scores``, by name (logged separately).
    """

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


@dataclass
class GroupRollout:
    """One batch of group-relative experience (GRPO, RLOO): B prompts with G samples each, N = B x G rows.

    Rows are prompt-major, as :func:`sample` with ``num_samples=G`` returns them: row ``b * G + g`` is sample
    ``g`` of prompt ``b``, so ``x.view(B, G)`` groups any ``(N,)`` tensor by prompt. There is no value head:
    the advantage is one number per sequence, broadcast over its tokens by the loss.

    Attributes:
        query: ``(N, P)`` long, each prompt's left-padded ids repeated G times (the update's forward passes take
            prompt and response row by row).
        query_mask: ``(N, P)`` long, 1 at real prompt tokens.
        response: ``(N, T)`` long, sampled response ids, right-padded after EOS.
        mask: ``(N, T)`` long, 1 at real response tokens up to and including EOS.
        logprobs: ``(N, T)`` float32, the policy's log-probs at sampling time: the "old" policy of the ratio over
            the iterations on this batch; None when the batch makes one update only (one iteration, one
            minibatch), where the old policy is the updated one itself and the update uses its own log-probs,
            detached (as TRL does).
        ref_logprobs: ``(N, T)`` float32 log-probs of the reference, or None when the KL coefficient is 0 (no
            reference pass is made).
        rewards: ``(N,)`` float32, the total reward of each sample.
        reward_parts: each reward function's ``(N,)`` part of ``rewards``, by name (logged separately).
        advantages: ``(N,)`` float32, from :func:`lit_ft.rl.advantages.group_advantages`.
        ended_with_eos: ``(N,)`` bool, whether the response ended with EOS.
        texts: N decoded responses.
        prompts: the B prompts, once each (row ``n`` answers ``prompts[n // G]``).
        group_size: G, samples per prompt.
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    rewards: torch.Tensor
    reward_parts: dict[str, torch.Tensor]
    advantages: torch.Tensor
    ended_with_eos: torch.Tensor
    texts: list[str]
    prompts: list[Prompt]
    group_size: int

    def __post_init__(self) -> None:
        if len(self.query) != len(self.prompts) * self.group_size:
            raise ValueError(f"{len(self.query)} rows are not {len(self.prompts)} prompts x {self.group_size} "
                             "samples")

    @property
    def num_groups(self) -> int:
        """B, the number of prompts."""
        return len(self.prompts)
