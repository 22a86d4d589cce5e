"""Loading the base: hub failures (gated, missing, offline) and hardware gaps (no flash-attn, no bf16) end in one
line or a logged fallback; 4-bit weights are stored in the compute dtype under FSDP; the record of how a base was
loaded (lit_ft_base.json) round-trips."""

from __future__ import annotations

import dataclasses
import json
import logging
import types

import pytest
import torch

from lit_ft.backbone import (
    Backbone,
    BackboneError,
    BackboneModule,
    build_model,
    load_base_model,
    load_tokenizer,
)
from lit_ft.backbone.base_record import BASE_FILE, BaseRecord, prompt_format_of
from lit_ft.backbone.builder import for_this_hardware
from tests.quantised_loading import fails_in_one_line
from tests.tiny_models import TINY
from tests.tiny_runs import save_tiny_base

GATED = "mistralai/Mistral-7B-v0.1"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("loading_base") / "tiny", tokenizer)


def _hub_refuses(monkeypatch, error: Exception) -> list:
    """Every hub download transformers tries raises ``error`` (as the hub does for a gated repo without access)."""
    from transformers.utils import hub

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:2])
        raise error

    monkeypatch.setattr(hub, "hf_hub_download", refuse)
    monkeypatch.setattr(hub, "snapshot_download", refuse)
    return calls


def _http_error(cls, status: int):
    response = types.SimpleNamespace(headers={}, request=None, status_code=status)
    return cls(f"{status} Client Error. Cannot access gated repo for url https://huggingface.co/api/models/{GATED}",
               response=response)


@pytest.mark.parametrize("status", [401, 403])
def test_a_gated_model_without_access_says_what_to_do(monkeypatch, capsys, status) -> None:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    for error in (_http_error(GatedRepoError, status), _http_error(HfHubHTTPError, status)):
        calls = _hub_refuses(monkeypatch, error)
        for load in (lambda: load_tokenizer(GATED), lambda: build_model(Backbone(pretrained=GATED, lora=None), None)):
            with pytest.raises(BackboneError) as info:
                load()
            message = str(info.value)
            assert message.startswith(f"{GATED}: a gated model") and "\n" not in message
            assert f"https://huggingface.co/{GATED}" in message and "hf auth login" in message and "HF_TOKEN" in message
        assert calls  # the hub was asked, and refused
    line = fails_in_one_line(capsys, ["generate", "--base", GATED, "--prompt", "Hi"], "accept its terms")
    assert line.startswith(f"lit-ft: error: {GATED}: a gated model")


def test_a_model_neither_cached_nor_reachable_is_one_line() -> None:
    # conftest sets HF_HUB_OFFLINE=1: the hub is not asked, the cache has no such model
    with pytest.raises(BackboneError, match="not in the local Hugging Face cache and the hub cannot be reached"):
        load_tokenizer("lit-ft-tests/no-such-model")


def test_flash_attention_2_without_flash_attn_is_one_line(monkeypatch, tiny_base, tokenizer) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    for spec in (Backbone(pretrained=tiny_base, attn_implementation="flash_attention_2", lora=None),
                 Backbone(tiny=TINY, attn_implementation="flash_attention_2", lora=None)):
        with pytest.raises(BackboneError, match="flash_attention_2 needs the flash-attn package .* sdpa or "
                                                "lit_ft_packed pack exactly without it"):
            build_model(spec, tokenizer)


def _gpu_without_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")


def test_bf16_on_a_gpu_without_it_falls_back_to_fp16_and_says_so(monkeypatch, caplog, tokenizer) -> None:
    _gpu_without_bf16(monkeypatch)
    spec = Backbone(tiny=TINY, dtype="bfloat16", compute_dtype="bfloat16", lora=None)
    with caplog.at_level(logging.WARNING, logger="lit_ft"):
        fallback = for_this_hardware(spec)
        model = load_base_model(spec, tokenizer)  # the tiny model is built on CPU: only the dtype choice is tested
    assert (fallback.dtype, fallback.compute_dtype) == ("float16", "float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    warnings = [r.getMessage() for r in caplog.records if "has no bfloat16" in r.getMessage()]
    assert warnings and "Tesla T4" in warnings[0] and "16-mixed" in warnings[0]
    assert for_this_hardware(dataclasses.replace(spec, dtype="float32", compute_dtype="float32")).dtype == "float32"


def test_bf16_stays_where_it_runs(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    spec = Backbone(tiny=TINY, dtype="bfloat16", compute_dtype="bfloat16", lora=None)
    assert for_this_hardware(spec) == spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU: bfloat16 always runs
    assert for_this_hardware(spec) == spec


class _Module(BackboneModule):
    def __init__(self, backbone: Backbone, strategy=None):
        self.backbone = backbone
        self._trainer = None if strategy is None else types.SimpleNamespace(strategy=strategy, datamodule=None)


def test_under_fsdp_4bit_weights_are_stored_in_the_compute_dtype(tiny_base, tokenizer) -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    spec = Backbone(pretrained=tiny_base, quantization="nf4", compute_dtype="bfloat16", lora=None)
    assert _Module(spec, FSDPStrategy()).load_spec().quant_storage == "bfloat16"
    assert _Module(spec, DDPStrategy()).load_spec().quant_storage == "uint8"
    assert _Module(spec).load_spec().quant_storage == "uint8"
    assert _Module(dataclasses.replace(spec, quant_storage="float32"), FSDPStrategy()).load_spec().quant_storage == (
        "float32")  # an explicit setting wins
    model = load_base_model(_Module(spec, FSDPStrategy()).load_spec(), tokenizer)
    import bitsandbytes as bnb

    storage = {m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert storage == {torch.bfloat16}  # what FSDP flattens together with the bf16 weights around it
    record = _Module(spec, FSDPStrategy()).base_record()
    assert (record.quant_storage, record.quantization, record.compute_dtype) == ("bfloat16", "nf4", "bfloat16")


def test_the_base_record_round_trips_and_tolerates_newer_fields(tmp_path) -> None:
    spec = Backbone(pretrained="some/base", quantization="nf4", dtype="bfloat16", compute_dtype="bfloat16")
    record = BaseRecord.of(spec, "chat", "builtin", stage="CausalLM")
    record.write(tmp_path)
    assert BaseRecord.read(tmp_path) == record
    back = record.backbone()
    assert (back.pretrained, back.quantization, back.dtype, back.compute_dtype, back.lora) == (
        "some/base", "nf4", "bfloat16", "bfloat16", None)
    values = json.loads((tmp_path / BASE_FILE).read_text())
    (tmp_path / BASE_FILE).write_text(json.dumps(dict(values, added_later=1)))
    assert BaseRecord.read(tmp_path) == record
    (tmp_path / BASE_FILE).write_text("{")
    with pytest.raises(BackboneError, match="lit_ft_base.json: unreadable"):
        BaseRecord.read(tmp_path)
    assert BaseRecord.read(tmp_path / "elsewhere") is None
    assert [prompt_format_of(f) for f in ("alpaca", "chat", "hh", "prompt", "prompt_completion", "auto")] == [
        "alpaca", "chat", "chat", "chat", "raw", None]
    assert prompt_format_of("auto", source=None) == "alpaca"  # the embedded data: Alpaca instruction records
