"""Shared checks for the tools that load a base as its adapter was trained: a 4-bit-recorded adapter, a spy on how
the tools load bases, and the one-line failure check of the real `lit-ft` command."""

from __future__ import annotations

import dataclasses
import importlib

import torch

from lit_ft.backbone import Backbone, LoraSettings, build_model, save_adapter, save_full_model
from lit_ft.backbone.base_record import BaseRecord
from tests.tiny_models import TINY


def sft_model_with_random_b(base: str, tokenizer):
    """``base`` with a LoRA adapter "sft" (r 4) whose B matrices are drawn from N(0, 0.5^2) with the global RNG as
    it stands (LoRA B starts at zero: an adapter that would not change the output)."""
    model = build_model(Backbone(pretrained=base, lora=LoraSettings(r=4, alpha=8, dropout=0.0, adapter_name="sft")),
                        tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def save_nf4_adapter(directory, base: str, tokenizer, prompt_format: str = "chat", seed: int = 0) -> str:
    """A LoRA adapter (non-zero B) whose record says its base was trained in 4-bit NF4 with bfloat16 compute."""
    torch.manual_seed(seed)
    model = sft_model_with_random_b(base, tokenizer)
    record = BaseRecord(base, quantization="nf4", dtype="bfloat16", compute_dtype="bfloat16",
                        prompt_format=prompt_format, chat_template="builtin", stage="CausalLM")
    return str(save_adapter(model, directory, "sft", tokenizer, record))


def save_wider_base(directory, tokenizer) -> str:
    """A tiny base of another shape (hidden size 64) than the tests' adapters are made for (32)."""
    torch.manual_seed(1)
    wider = dataclasses.replace(TINY, hidden_size=64, intermediate_size=128)
    model = build_model(Backbone(tiny=wider, lora=None), tokenizer)
    return str(save_full_model(model, directory, tokenizer))


class LoadedBases:
    """Spy on how the tools load bases: for every base ``module.load_base_model`` builds, the model and its 4-bit
    layers as loaded (``(quant_type, compute_dtype)`` each; an export dequantises them in place later)."""

    def __init__(self, monkeypatch, module: str = "lit_ft.tools.loading"):
        import bitsandbytes as bnb

        target = importlib.import_module(module)
        real = target.load_base_model
        self.models: list = []
        self.layers: list[list[tuple[str, torch.dtype]]] = []

        def spy(*args, **kwargs):
            model = real(*args, **kwargs)
            self.models.append(model)
            self.layers.append([(m.weight.quant_type, m.compute_dtype) for m in model.modules()
                                if isinstance(m, bnb.nn.Linear4bit)])
            return model

        monkeypatch.setattr(target, "load_base_model", spy)

    def linear_4bit(self, index: int = -1) -> list[tuple[str, torch.dtype]]:
        return self.layers[index]


def assert_nf4_bf16(loaded: LoadedBases, index: int = -1) -> None:
    """The base was loaded in 4-bit NF4 with bfloat16 compute (every decoder linear layer)."""
    layers = loaded.linear_4bit(index)
    assert layers, "the base was not loaded in 4 bits"
    assert set(layers) == {("nf4", torch.bfloat16)}


def fails_in_one_line(capsys, args: list[str], expected: str) -> str:
    """Run the real `lit-ft` command: exit code 2, no traceback, one error line holding ``expected`` (the bad-input
    suite's check), and that line is lit-ft's own."""
    from tests.integration.test_bad_input import _fails_with_one_line

    line = _fails_with_one_line(capsys, args, expected)
    assert line.startswith("lit-ft: error:"), line
    return line
