"""The dependency floors of pyproject.toml: the installed versions meet them, and the reason given for each floor
holds in what is installed (so a floor lowered below what the code needs shows here first)."""

from __future__ import annotations

import importlib.metadata
import inspect
import re

import torch
from packaging.requirements import Requirement
from packaging.version import Version

from tests.tiny_models import ROOT

FLOORS = {"torch": "2.6", "lightning": "2.5", "transformers": "5.24", "peft": "0.18", "bitsandbytes": "0.46.1",
          "safetensors": "0.8"}


def _requirements() -> dict[str, Requirement]:
    """The project's dependencies, as pyproject.toml lists them (one quoted requirement a line)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("dependencies = ["):text.index("]", text.index("dependencies = ["))]
    lines = re.findall(r'^\s*"([^"]+)",', block, flags=re.MULTILINE)
    return {Requirement(line).name.lower(): Requirement(line) for line in lines}


def test_installed_versions_meet_every_floor() -> None:
    for name, requirement in _requirements().items():
        installed = importlib.metadata.version(name)
        assert requirement.specifier.contains(Version(installed), prereleases=True), (name, installed, requirement)


def test_the_floors_are_the_ones_the_code_needs() -> None:
    requirements = _requirements()
    for name, floor in FLOORS.items():
        minimums = [s.version for s in requirements[name].specifier if s.operator == ">="]
        assert minimums == [floor], (name, minimums)
    comments = {m.group(1): m.group(2) for m in re.finditer(r'"([a-z_]+)>=[^"]+",\s*#\s*(.+)',
                                                             (ROOT / "pyproject.toml").read_text())}
    assert set(FLOORS) <= set(comments), "every checked floor carries its reason in pyproject.toml"


def test_the_reasons_for_the_floors_hold_in_what_is_installed(tmp_path) -> None:
    from transformers import MistralForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # transformers: the KV cache is passed as `cache` and returned as `.cache` (rl/rollout.py)
    assert "cache" in inspect.signature(MistralForCausalLM.forward).parameters
    assert "cache" in CausalLMOutputWithPast.__dataclass_fields__
    # torch: grouped-query attention in SDPA (backbone/packed_attention.py)
    q, kv = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 8)
    assert torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True).shape == (1, 4, 3, 8)
    # safetensors: reading without a memory map (the tools' 4-bit load)
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 3)}, tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt", device="cpu", backend="pread") as f:
        assert torch.equal(f.get_slice("w")[...], torch.ones(2, 3))
    # peft imports under transformers 5; bitsandbytes' CPU backend exists (NF4 on CPU: the tests use it throughout)
    import bitsandbytes
    import peft  # noqa: F401

    assert hasattr(bitsandbytes, "backends")
