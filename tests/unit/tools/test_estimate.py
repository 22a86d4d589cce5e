"""The memory estimator: hand-computed Mistral-7B-v0.1 numbers, PEFT's own LoRA count, bitsandbytes' own NF4
storage, and the activation model against the tensors autograd really saves on a tiny model (CPU)."""

from __future__ import annotations

import pytest
import torch

from lit_ft.tools.estimate import (
    ModelShape,
    TrainingSetup,
    estimate,
    hf_config,
    lora_param_count,
    main,
    meta_model,
    nf4_bytes,
)
from tests.tiny_models import ROOT

# Mistral-7B-v0.1 by hand: h=4096, kv=8*128=1024, I=14336, 32 layers, vocab 32000, untied head.
H, KV, INTER, LAYERS, VOCAB = 4096, 1024, 14336, 32, 32000
LINEARS_PER_LAYER = [(H, H), (H, KV), (H, KV), (H, H), (H, INTER), (H, INTER), (INTER, H)]  # q k v o gate up down
MISTRAL_PARAMS = LAYERS * (sum(i * o for i, o in LINEARS_PER_LAYER) + 2 * H) + 2 * VOCAB * H + H
MISTRAL_LORA_R16 = LAYERS * sum(16 * (i + o) for i, o in LINEARS_PER_LAYER)


@pytest.fixture(scope="module")
def mistral():
    config, source = hf_config("mistralai/Mistral-7B-v0.1")
    return config, ModelShape.from_hf(config, source), meta_model(config)


def test_mistral_7b_parameter_count(mistral) -> None:
    _, shape, model = mistral
    assert MISTRAL_PARAMS == 7_241_732_096
    assert sum(p.numel() for p in model.parameters()) == MISTRAL_PARAMS
    assert all(p.device.type == "meta" for p in model.parameters())  # no weights were loaded
    assert (shape.num_kv_heads, shape.head_dim, shape.tied_embeddings) == (8, 128, False)


def test_lora_count_matches_hand_computed_and_peft(mistral) -> None:
    from peft import LoraConfig, get_peft_model

    config, _, model = mistral
    assert MISTRAL_LORA_R16 == 41_943_040
    assert lora_param_count(model, 16, "all-linear") == MISTRAL_LORA_R16
    peft_model = get_peft_model(meta_model(config), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                task_type="CAUSAL_LM"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == MISTRAL_LORA_R16
    assert lora_param_count(model, 8, ["q_proj", "v_proj"]) == LAYERS * 8 * ((H + H) + (H + KV))


def test_nf4_bytes_hand_computed_and_against_bitsandbytes(mistral) -> None:
    _, shape, model = mistral
    est = estimate(shape, TrainingSetup(quantization="nf4", dtype_bytes=2, compute_bytes=2), model)
    quantized = MISTRAL_PARAMS - 2 * VOCAB * H - (2 * LAYERS + 1) * H
    blocks = quantized // 64
    second_level = LAYERS * 4 * sum(i * o // 64 // 256 for i, o in LINEARS_PER_LAYER)
    with_dq = quantized // 2 + blocks + second_level + 4 * 7 * LAYERS  # data + 8-bit absmax + fp32 absmax + offset
    without_dq = quantized // 2 + 4 * blocks
    lines = {line.name.strip(): line for line in est.lines}
    assert lines["NF4 4-bit linears, double quant"].bytes == with_dq == 3_600_417_664
    assert lines["NF4 4-bit linears, no double quant"].bytes == without_dq == 3_925_868_544
    assert lines["fp32 embeddings, head, norms"].count == MISTRAL_PARAMS - quantized

    import bitsandbytes.functional as bnbf

    weight = torch.randn(384, 160)  # 960 blocks: the nested absmax needs 4 blocks of 256, the last one partial
    data, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True, blocksize=64)
    real = (data.numel() * data.element_size() + state.absmax.numel() * state.absmax.element_size()
            + state.state2.absmax.numel() * state.state2.absmax.element_size() + 4)
    assert nf4_bytes([weight.numel()], True) == real
    data, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=False, blocksize=64)
    assert nf4_bytes([weight.numel()], False) == data.numel() + state.absmax.numel() * 4


class _Tok:
    """Enough of a tokenizer for build_model on the tiny config."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 32000


@pytest.mark.parametrize("autocast,attn", [(False, "sdpa"), (True, "sdpa"), (True, "eager")])
def test_activation_model_matches_saved_tensors_of_a_tiny_model(autocast: bool, attn: str) -> None:
    """Sum the bytes of every distinct storage autograd saves in a LoRA forward (parameters excluded) and compare
    with the estimate's activations, attention mask, autocast weight copies and kept log-softmax."""
    from lit_ft.backbone import build_model, decoder_and_head
    from lit_ft.losses.lm import supervised_token_loss
    from tests.tiny_models import tiny_backbone

    torch.manual_seed(0)
    model = build_model(tiny_backbone(lora=True, attn=attn), _Tok()).train()
    rows, length = 2, 64
    ids = torch.randint(3, 32000, (rows, length))
    position_ids = torch.cat([torch.arange(40), torch.arange(24)]).expand(rows, length)  # two packed examples
    labels = ids.clone()
    labels[:, :10] = -100
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    decoder, head = decoder_and_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            hidden = decoder(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
        body, saved = sum(saved.values()), {}
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            _, supervised = supervised_token_loss(hidden, head, labels, chunk_size=50)
        loss = sum(saved.values())
    shape = ModelShape.from_hf(model.get_base_model().config)
    setup = TrainingSetup(micro_batch_size=rows, seq_length=length, packing=True, dtype_bytes=4,
                          compute_bytes=2 if autocast else 4, attn_implementation=attn, lora_r=4, lora_dropout=0.0,
                          supervised_fraction=int(supervised) / (rows * (length - 1)), loss_chunk_size=50)
    lines = estimate(shape, setup).lines
    predicted_body = sum(x.bytes for x in lines if x.name.startswith(("activations, no", "attention mask",
                                                                        "autocast weight")))
    predicted_loss = sum(x.bytes for x in lines if x.name.startswith(("log-softmax", "head weight cast",
                                                                        "loss gradient kept")))
    assert predicted_body == pytest.approx(body, rel=0.08)
    assert predicted_loss == pytest.approx(loss, rel=0.01)


def test_checkpointing_batch_and_packing_change_the_estimate(mistral) -> None:
    _, shape, model = mistral
    base = TrainingSetup(quantization="nf4", dtype_bytes=2, compute_bytes=2, micro_batch_size=4, seq_length=2048,
                         gradient_checkpointing=True, lora_dropout=0.05)
    est = estimate(shape, base, model)
    acts = {x.name: x.bytes for x in est.lines}
    ckpt, full = acts["activations, gradient checkpointing"], acts["activations, no checkpointing"]
    assert full > 8 * ckpt  # per-layer recomputation keeps one layer of 32 plus each layer's input
    per_token_layer = (full - 4 * H * 4 * 2048) / (LAYERS * 4 * 2048)
    assert 240_000 < per_token_layer < 300_000  # the docstring's ~268 kB/token/layer for this setup
    double = estimate(shape, TrainingSetup(**{**base.__dict__, "micro_batch_size": 8}), model)
    doubled = {x.name: x.bytes for x in double.lines}
    assert doubled["activations, gradient checkpointing"] == 2 * ckpt
    padded = estimate(shape, TrainingSetup(**{**base.__dict__, "packing": False, "micro_batch_size": 1}), model)
    assert not any(x.name.startswith("attention mask") for x in padded.lines)  # one unpadded row: causal only


def test_cli_reads_the_composed_config(capsys) -> None:
    main(["--config", str(ROOT / "configs/sft.yaml"), "--config", str(ROOT / "configs/mistral7b_qlora_alpaca.yaml"),
          "--supervised-fraction", "0.5"])
    out = capsys.readouterr().out
    assert "mistralai/Mistral-7B-v0.1" in out and "7,241,732,096" in out and "41,943,040" in out
    assert "micro-batch 4 x 2048 packed, optimizer PagedAdamW" in out and "nf4" in out
    assert "peak allocated" in out


def test_cli_tiny_config_without_weights(capsys) -> None:
    main(["--config", str(ROOT / "configs/pretrain.yaml"), "--json"])
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["shape"]["hidden_size"] == 128 and report["setup"]["lora_r"] is None
    trainable = next(x for x in report["lines"] if x["name"].startswith("gradients"))
    params = next(x for x in report["lines"] if x["name"].startswith("parameters"))
    assert trainable["count"] == params["count"]  # pre-training: every parameter trains
