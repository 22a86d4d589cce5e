"""Tiny model settings shared by the tests: a few-thousand-parameter Mistral body on the real 32k vocabulary."""

from __future__ import annotations

import shlex
from pathlib import Path

import lightning as L
import torch

from lit_ft.backbone import Backbone, LoraSettings, TinyConfig

ROOT = Path(__file__).resolve().parents[1]

TINY = TinyConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_backbone(lora: bool = True, attn: str = "sdpa", **overrides) -> Backbone:
    """A from-scratch tiny backbone; LoRA without dropout so that runs are deterministic."""
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, adapter_name="sft") if lora else None
    return Backbone(pretrained=None, tiny=TINY, attn_implementation=attn, lora=settings, **overrides)


def tiny_mistral(attn: str = "sdpa", vocab_size: int = 32000, seed: int = 0):
    """A bare ``MistralForCausalLM`` in fp32 with the given attention backend."""
    from dataclasses import asdict

    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=vocab_size, tie_word_embeddings=False, **asdict(TINY))
    config._attn_implementation = attn
    return MistralForCausalLM(config).eval()


class StopAt(L.Callback):
    """Interrupts a run after ``step`` optimizer steps, as a crash would (the schedule still spans max_steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def config_command(config: Path) -> list[str]:
    """The `lit-ft ...` command given in the config's first comment line, as arguments (its files made absolute)."""
    first = config.read_text().splitlines()[0]
    assert first.startswith("# lit-ft "), f"{config.name}: first line must give the command that runs it"
    args = shlex.split(first[len("# lit-ft ") :].split("  ")[0])
    return [str(ROOT / a) if a.startswith(("configs/", "sweeps/", "examples/")) else a for a in args]
