"""NEFTune (Jain et al. 2023): uniform noise on input embeddings during training.

The paper scales noise by ``alpha / sqrt(L * d)`` where L is the sequence length. Implementations that compute L
from the tensor shape use the padded or packed *row* length, so an example packed into a 2048-token row gets far
less noise than the same example alone (transformers #34659). Here L is each token's own example length.
"""

from __future__ import annotations

import torch


def neftune_noise(
    embeds: torch.Tensor, example_lengths: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise to add to ``embeds`` (B, T, d): uniform in ``[-1, 1]`` times ``alpha / sqrt(L * d)``.

    ``example_lengths`` (B, T) holds, for each token, the length of the example it belongs to.
    """
    d = embeds.shape[-1]
    scale = alpha / torch.sqrt(example_lengths.clamp(min=1).to(torch.float32) * d)
    uniform = torch.rand(embeds.shape, generator=generator, device=embeds.device, dtype=torch.float32)
    return ((uniform * 2 - 1) * scale.unsqueeze(-1)).to(embeds.dtype)


class NEFTune:
    """Forward hook on the input-embedding module; set the per-token lengths before each training forward.

    Active only while the embedding module is in training mode and lengths were set for this forward.
    """

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None
        self._handle = None

    def attach(self, embedding: torch.nn.Module) -> NEFTune:
        if self._handle is None:
            self._handle = embedding.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        lengths, self.lengths = self.lengths, None
        if not module.training or self.alpha <= 0 or lengths is None:
            return None
        return output + neftune_noise(output, lengths.to(output.device), self.alpha)
