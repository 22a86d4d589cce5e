"""The shared backbone: one builder for the tokenizer, the (optionally 4-bit) base model and its LoRA adapters.

Every stage (pre-training, SFT, reward model, PPO) builds its model here, so that adapters trained by one stage
load back onto the same base in another.

Model sources:
* ``pretrained=None``: a small Mistral-architecture model built from :class:`TinyConfig` with random weights and
  the real Mistral-7B-v0.1 tokenizer (shipped by ``mistral_common``). This is what ``make pretrain`` trains.
* ``pretrained="<local dir>"``: a saved transformers model (the embedded base after ``make pretrain``).
* ``pretrained="<hub id>"``: e.g. ``mistralai/Mistral-7B-v0.1``, downloaded by transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lit_ft.backbone.adapters import add_adapter, load_adapter, replace_dir, resolve_init_adapter
from lit_ft.backbone.packed_attention import PACKED_ATTENTION, register_packed_attention
from lit_ft.errors import BackboneError

EMBEDDED_TOKENIZER = "embedded:mistral-7b-v0.1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TinyConfig:
    """Sizes of the embedded Mistral-architecture model built from scratch.

    Args:
        hidden_size: model width (128: on 2 CPU cores it learned the embedded tasks faster than 256, because
            the 32k-vocabulary output layer dominates the cost and steps are 1.7x quicker).
        intermediate_size: SwiGLU width (344: 2.7x the width, rounded to a multiple of 8).
        num_hidden_layers: decoder layers (4).
        num_attention_heads: query heads (4: head dim 32, as small as is still useful for RoPE).
        num_key_value_heads: grouped-query KV heads (2: keeps Mistral's GQA shape).
        max_position_embeddings: longest sequence (2048: covers packed rows of the embedded data).
        rope_theta: RoPE base (10000.0: Mistral-7B-v0.1's value).
    """

    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0


@dataclass
class LoraSettings:
    """LoRA adapter settings (PEFT).

    Args:
        r: rank (16: QLoRA paper's 7B setting on all linear layers).
        alpha: scaling numerator, the update is scaled by alpha/r (32: twice r, the common QLoRA choice).
        dropout: dropout on the adapter input (0.05: QLoRA paper's value for 7B-13B models).
        target_modules: module names to adapt, or "all-linear" (QLoRA: every linear layer but the output head).
        adapter_name: the adapter's name, so one base can hold several (policy, value, reward).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    adapter_name: str = "default"


@dataclass
class Backbone:
    """Where the base model comes from and how it is loaded and adapted.

    Args:
        pretrained: hub id or local directory of a transformers causal LM; None builds ``tiny`` from scratch.
        tokenizer: hub id or local directory; None uses the pretrained model's own tokenizer, or the embedded
            Mistral-7B-v0.1 tokenizer for a model built from ``tiny``.
        tiny: sizes of the from-scratch model (used only when ``pretrained`` is None).
        quantization: "none", or "nf4" for 4-bit NormalFloat with double quantisation (QLoRA).
        dtype: dtype of the non-quantised weights ("float32" on CPU; "bfloat16" halves memory on GPU).
        compute_dtype: dtype of 4-bit matmuls ("bfloat16" is the QLoRA paper's; use "float32" on CPU); with nf4 also
            the dtype the non-quantised weights are kept in for training (docs/memory.md).
        attn_implementation: "eager", "sdpa", "flex_attention", "flash_attention_2" or "lit_ft_packed" (SDPA per
            packed example: attention costs sum(L_i^2), not row^2; see lit_ft.backbone.packed_attention); packing is exact
            on each.
        gradient_checkpointing: recompute activations in the backward pass (saves memory, costs ~30% time).
        lora: LoRA settings; None trains every parameter (used by pre-training).
        init_adapter: a PEFT adapter directory (e.g. the SFT output) whose weights initialise the new adapter;
            its LoRA settings (r, alpha, targets) replace ``lora``'s. None starts from a fresh adapter.
        init_adapter_required: fail when ``init_adapter`` does not exist (False: fall back to a fresh adapter,
            which lets a config start from the SFT output when there is one and from the base otherwise).
    """

    pretrained: str | None = None
    tokenizer: str | None = None
    tiny: TinyConfig = field(default_factory=TinyConfig)
    quantization: Literal["none", "nf4"] = "none"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    init_adapter: str | None = None
    init_adapter_required: bool = True

    def __post_init__(self) -> None:
        # jsonargparse hands `--model.backbone.init_adapter null` to a nested dataclass as the string "None".
        for name in ("pretrained", "tokenizer", "init_adapter"):
            if getattr(self, name) in ("None", "null"):
                setattr(self, name, None)


# Checkpoints store these settings as hyper-parameters; allow them in weights-only loading (resume).
torch.serialization.add_safe_globals([Backbone, TinyConfig, LoraSettings])


def _embedded_tokenizer():
    import mistral_common
    from transformers import AutoTokenizer

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not src.exists():
        raise BackboneError(f"{src}: the Mistral-7B-v0.1 tokenizer is missing from mistral_common")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(src, Path(tmp) / "tokenizer.model")
        return AutoTokenizer.from_pretrained(tmp)


def load_tokenizer(name: str | None):
    """Load a tokenizer and give it a pad token distinct from EOS (so that the model learns to stop).

    ``None`` (or ``"embedded:mistral-7b-v0.1"``) is the real Mistral-7B-v0.1 tokenizer from ``mistral_common``.
    Without a pad token, or with pad == EOS, the unknown token pads (Mistral has ``<unk>``); a tokenizer without
    one gets a new ``<pad>`` token and the model's embeddings must be resized (:func:`build_model` does).
    """
    from transformers import AutoTokenizer

    if name in (None, EMBEDDED_TOKENIZER):
        tok = _embedded_tokenizer()
    else:
        if looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
            raise BackboneError(f"{name}: model/tokenizer directory not found (`make pretrain` builds the embedded base)")
        name = os.path.expanduser(name)
        tok = AutoTokenizer.from_pretrained(name)
    if tok.eos_token_id is None:
        raise BackboneError(f"{name or EMBEDDED_TOKENIZER}: the tokenizer has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name``): starts with ., / or ~, or has more than one slash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.isdir(name)


def _tiny_model(spec: Backbone, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # Mistral-7B-v0.1 unties them
        **asdict(spec.tiny),
    )
    cfg._attn_implementation = spec.attn_implementation
    return MistralForCausalLM(cfg).to(DTYPES[spec.dtype])


def _pretrained_model(spec: Backbone, device_map=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name = spec.pretrained
    if looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
        raise BackboneError(f"{name}: model directory not found (run `make pretrain` for the embedded base)")
    kwargs = {"dtype": DTYPES[spec.dtype], "attn_implementation": spec.attn_implementation}
    if spec.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # QLoRA: quantise the quantisation constants too (~0.37 bit/param saved)
            bnb_4bit_compute_dtype=DTYPES[spec.compute_dtype],
            bnb_4bit_quant_storage=torch.uint8,
        )
        if device_map is not None:
            kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), **kwargs)


def build_model(spec: Backbone, tokenizer, device_map=None):
    """Build the base model (from scratch, a local directory or the hub), quantise it, then add LoRA.

    Returns a ``PeftModel`` with the adapter ``spec.lora.adapter_name`` active, or the plain model when
    ``spec.lora`` is None (every parameter then trains).
    """
    if spec.attn_implementation == PACKED_ATTENTION:
        register_packed_attention()  # transformers must know the name before the model is built
    if spec.pretrained is None:
        if spec.quantization != "none":
            raise BackboneError("quantization: nf4 needs pretrained weights (set model.backbone.pretrained)")
        model = _tiny_model(spec, tokenizer)
    else:
        model = _pretrained_model(spec, device_map)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # training: a KV cache would also disable packed-sequence masking

    if spec.quantization == "nf4":
        # The lean preparation (docs/memory.md), not peft.prepare_model_for_kbit_training: that one up-casts the
        # embeddings, norms and head to fp32, so the residual stream, every 4-bit linear's output (bitsandbytes
        # returns its input's dtype), the checkpointed layer inputs and the loss's head all become fp32. Here the
        # base is frozen and its non-quantised weights stay in the compute dtype; RMSNorm still normalises in fp32
        # and the loss accumulates its log-sum-exp in fp32. 4-bit weights keep their storage (a float quant_storage
        # holds packed 4-bit data: never cast it).
        from bitsandbytes.nn import Params4bit

        for p in model.parameters():
            p.requires_grad_(False)
            if p.is_floating_point() and not isinstance(p, Params4bit):
                p.data = p.data.to(DTYPES[spec.compute_dtype])
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # checkpointed layers see an input that requires grad (frozen embeddings)

    if spec.lora is None:
        return model
    init = resolve_init_adapter(spec)
    if init is None:
        return add_adapter(model, spec.lora)
    return load_adapter(model, init, spec.lora.adapter_name, trainable=True)


def save_full_model(model, directory: str | os.PathLike, tokenizer, metadata: dict | None = None) -> Path:
    """Save a plain transformers model with its tokenizer (atomically: temporary folder, then rename)."""
    out = Path(directory)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if metadata:
        (tmp / "lit_ft.json").write_text(json.dumps(metadata, indent=2))
    replace_dir(tmp, out)
    return out


def decoder_and_head(model):
    """The transformer body (returns hidden states) and the output projection, through any PEFT wrapping.

    Losses that only need logits at some positions call the body, then the head on those positions alone.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


class BackboneModule:
    """For LightningModules built on a :class:`Backbone` (``self.backbone``): the tokenizer, loaded on first use
    (the data module needs it before the model is built), and where a 4-bit model must be loaded.
    """

    _tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.backbone.tokenizer or self.backbone.pretrained)
        return self._tokenizer

    def quantized_device_map(self) -> dict[str, str] | None:
        """bitsandbytes places 4-bit weights at load time: on the strategy's device when a trainer is attached."""
        if self.backbone.quantization == "none" or getattr(self, "_trainer", None) is None:
            return None
        return {"": str(self.trainer.strategy.root_device)}
