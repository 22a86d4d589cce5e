"""The sampler's KV caches: a preallocated cache of our own, and transformers' static and dynamic ones.

:class:`PreallocatedLayer` keeps the semantics of transformers' ``DynamicLayer`` (attention runs over exactly the
columns filled so far, so its numbers are those of the dynamic cache to the bit) but writes each new column into
storage allocated once for prompt + ``max_new_tokens`` instead of concatenating: nothing is reallocated per token.
transformers' ``StaticCache`` also preallocates, but attends over every column, filled or not (its fixed shapes
are for ``torch.compile``), which rounds differently from the dynamic cache and costs attention over empty columns.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache

SamplerCache = Literal["preallocated", "static", "dynamic"]
SAMPLER_CACHES = ("preallocated", "static", "dynamic")


class PreallocatedLayer(DynamicLayer):
    """One decoder layer's keys and values in storage of ``max_length`` columns, filled left to right.

    ``keys``/``values`` are views of the filled columns, so every reader of a ``DynamicLayer`` (the attention,
    the mask sizes, ``get_seq_length``) sees what it expects. The sliding window, where the model has one, is
    applied by the attention mask, as it is for a dynamic cache that has not reached the window.
    """

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.length = 0
        self.key_storage: torch.Tensor | None = None
        self.value_storage: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        self.key_storage = key_states.new_empty(batch, heads, self.max_length, key_states.shape[-1])
        self.value_storage = value_states.new_empty(batch, heads, self.max_length, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_length:
            raise ValueError(f"the preallocated KV cache holds {self.max_length} columns, {end} were asked for")
        self.key_storage[:, :, self.length:end] = key_states
        self.value_storage[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_storage[:, :, :end], self.value_storage[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select (or repeat) rows: the storage is indexed as a whole, the views follow."""
        if not self.is_initialized:
            return
        index = beam_idx.to(self.device)
        self.key_storage = self.key_storage.index_select(0, index)
        self.value_storage = self.value_storage.index_select(0, index)
        self.keys = self.key_storage[:, :, :self.length]
        self.values = self.value_storage[:, :, :self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self.key_storage.shape[0], device=self.device)
            self.reorder_cache(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices, device=self.device))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the sampler never crops its cache")


def new_cache(model: nn.Module, kind: SamplerCache, max_length: int) -> Cache:
    """An empty KV cache of ``kind`` for ``model`` (a transformers model, PEFT-wrapped or not), room for
    ``max_length`` columns where it preallocates."""
    config = model.config.get_text_config(decoder=True)
    if kind == "preallocated":
        return Cache(layers=[PreallocatedLayer(max_length) for _ in range(config.num_hidden_layers)])
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_length)
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    raise ValueError(f"unknown sampler cache {kind!r}; choose one of {SAMPLER_CACHES}")
