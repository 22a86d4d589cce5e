"""lit_ft's lean 4-bit preparation (build_model with nf4): the base frozen, non-quantised weights in the compute
dtype (not PEFT's fp32 up-cast), 4-bit storage untouched, LoRA alone trainable, checkpointing with input grads."""

from __future__ import annotations

import pytest
import torch

from lit_ft.backbone import Backbone, LoraSettings, build_model


class _Tok:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 500


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> str:
    from tests.tiny_models import tiny_mistral

    directory = tmp_path_factory.mktemp("tiny_hub_500")
    tiny_mistral(vocab_size=500).save_pretrained(directory)  # fp32 on disk
    return str(directory)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_nf4_base_is_frozen_in_the_compute_dtype(hub_dir: str, checkpointing: bool) -> None:
    import bitsandbytes as bnb

    spec = Backbone(pretrained=hub_dir, quantization="nf4", dtype="float32", compute_dtype="bfloat16",
                    gradient_checkpointing=checkpointing,
                    lora=LoraSettings(r=4, alpha=8, dropout=0.0, adapter_name="sft"))
    model = build_model(spec, _Tok())
    base = model.get_base_model()
    quantized = [m.weight for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(w.dtype == torch.uint8 and not w.requires_grad for w in quantized)
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.dtype == torch.float32, name  # adapters train in fp32
        else:
            assert not p.requires_grad, name
            assert p.dtype in (torch.uint8, torch.bfloat16), name  # embeddings, norms, head: bf16, not fp32
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert base.is_gradient_checkpointing == checkpointing
    ids = torch.randint(3, 500, (1, 12))
    embedded = base.get_input_embeddings()(ids)
    assert embedded.dtype == torch.bfloat16 and embedded.requires_grad == checkpointing  # input grads for ckpt
