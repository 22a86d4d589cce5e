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

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from lit_ft.backbone.adapters import add_adapter, load_adapter, resolve_init_adapter, staged_dir
from lit_ft.backbone.packed_attention import PACKED_ATTENTION, register_packed_attention
from lit_ft.errors import BackboneError

log = logging.getLogger("lit_ft")

EMBEDDED_TOKENIZER = "embedded:mistral-7b-v0.1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_STORAGES = {"uint8": torch.uint8, **DTYPES}
# attention backends that need a package besides torch and transformers: name -> (import name, pip name)
ATTENTION_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"), "flash_attention_3": ("flash_attn_interface",
                                                                                               "flash-attn-3")}


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
        quantization: "none", or "nf4" for 4-bit NormalFloat (QLoRA).
        dtype: dtype of the non-quantised weights ("float32" on CPU; "bfloat16" halves memory on GPU). On a GPU
            without bfloat16 (T4, V100) a bfloat16 here is loaded as float16, with a warning.
        compute_dtype: dtype of 4-bit matmuls ("bfloat16" is the QLoRA paper's; use "float32" on CPU); with nf4 also
            the dtype the non-quantised weights are kept in for training (docs/memory.md). The same float16 fallback
            applies.
        double_quant: quantise the 4-bit quantisation constants too (True: QLoRA's double quantisation, ~0.37
            bit per parameter saved).
        quant_storage: dtype the packed 4-bit weights are stored in. "auto": uint8, or the compute dtype under
            FSDP, which can only shard parameters of one floating dtype (bitsandbytes' ``bnb_4bit_quant_storage``).
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
    double_quant: bool = True
    quant_storage: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = "auto"
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
        with hub_errors(name):
            tok = AutoTokenizer.from_pretrained(name)
    if tok.eos_token_id is None:
        raise BackboneError(f"{name or EMBEDDED_TOKENIZER}: the tokenizer has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


@contextlib.contextmanager
def hub_errors(name: str) -> Iterator[None]:
    """Turn a failed hub download of ``name`` into one line saying what to do (gated, missing, offline).

    transformers wraps huggingface_hub's errors in ``OSError``; the hub's own error is found in the cause chain.
    """
    try:
        yield
    except (OSError, ValueError) as err:
        reason = _hub_failure(err, name)
        if reason is None:
            raise
        raise BackboneError(f"{name}: {reason}") from None


def _hub_failure(err: BaseException, name: str) -> str | None:
    """What went wrong with a hub download, as advice for the user; None when ``err`` is not a hub failure."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        status = getattr(getattr(err, "response", None), "status_code", None)
        if isinstance(err, GatedRepoError) or (isinstance(err, HfHubHTTPError) and status in (401, 403)):
            return (f"a gated model this machine may not download: accept its terms on "
                    f"https://huggingface.co/{name} with your account, then {login}")
        if isinstance(err, RepositoryNotFoundError):
            return f"not found on the Hugging Face Hub (a private model needs access: {login})"
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return ("not in the local Hugging Face cache and the hub cannot be reached (no network, or "
                    "HF_HUB_OFFLINE=1); download it once with network, or give a local directory")
        err = err.__cause__ or err.__context__
    return None


def looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name``): starts with ., / or ~, or has more than one slash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.isdir(name)


def bf16_capable() -> bool:
    """Whether bfloat16 runs natively here: always on CPU, on CUDA GPUs from Ampere on (not T4, V100)."""
    if not torch.cuda.is_available():
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


_WARNED: set[str] = set()


def for_this_hardware(spec: Backbone) -> Backbone:
    """``spec`` with what this machine cannot run replaced or refused, in one line each.

    * bfloat16 (``dtype``, ``compute_dtype``) on a GPU without it: float16, logged (QLoRA's usual choice there).
    * an attention backend whose package is missing (flash_attention_2 without flash-attn): a BackboneError.
    """
    package = ATTENTION_PACKAGES.get(spec.attn_implementation)
    if package is not None and importlib.util.find_spec(package[0]) is None:
        raise BackboneError(f"attn_implementation: {spec.attn_implementation} needs the {package[1]} package (pip "
                            f"install {package[1]}, CUDA only); sdpa or lit_ft_packed pack exactly without it")
    swapped = {name: "float16" for name in ("dtype", "compute_dtype") if getattr(spec, name) == "bfloat16"}
    if not swapped or bf16_capable():
        return spec
    message = (f"{torch.cuda.get_device_name()} has no bfloat16: loading the base with "
               f"{' and '.join(swapped)} float16 instead (set them to float16, and trainer.precision: 16-mixed, "
               "to silence this)")
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("lit_ft: %s", message)
    return replace(spec, **swapped)


def quant_storage(spec: Backbone, fsdp: bool = False) -> str:
    """The storage dtype of packed 4-bit weights: ``spec.quant_storage``, or for "auto" uint8, and the compute
    dtype under FSDP (which flattens parameters of one dtype into shards)."""
    if spec.quant_storage != "auto":
        return spec.quant_storage
    return spec.compute_dtype if fsdp else "uint8"


def _tiny_model(spec: Backbone, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    spec = for_this_hardware(spec)
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


def _pretrained_model(spec: Backbone, device_map=None, low_host_memory: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name = spec.pretrained
    if looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
        raise BackboneError(f"{name}: model directory not found (run `make pretrain` for the embedded base)")
    spec = for_this_hardware(spec)
    kwargs = {"dtype": DTYPES[spec.dtype], "attn_implementation": spec.attn_implementation}
    if spec.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=DTYPES[spec.compute_dtype],
            bnb_4bit_quant_storage=QUANT_STORAGES[quant_storage(spec)],
        )
        if device_map is not None:
            kwargs["device_map"] = device_map
    name = os.path.expanduser(name)
    with hub_errors(name):
        if low_host_memory and spec.quantization == "nf4":
            model = _read_then_quantize(name, kwargs)
            if model is not None:
                return model
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)


def _read_then_quantize(name: str, kwargs: dict):
    """``from_pretrained`` for a 4-bit load that keeps host memory near the quantised size, or None when the
    checkpoint is not in safetensors.

    transformers memory-maps every shard for the whole load, so the host holds the full 16-bit checkpoint in
    mapped pages by the end (14.5 GB for Mistral-7B) though each weight is read once and quantised. Here each
    weight is read with ``pread`` into its own buffer, quantised, and freed; and glibc is told to return large
    freed buffers to the system at once (its default threshold grows to 32 MB and keeps them in the heap).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils.hub import cached_file

    def find(filename: str) -> str | None:
        return cached_file(name, filename, _raise_exceptions_for_missing_entries=False)

    index = find("model.safetensors.index.json")
    if index is not None:
        files = [find(shard) for shard in sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))]
    else:
        files = [find("model.safetensors")]
    if not files or None in files:
        return None
    config = AutoConfig.from_pretrained(name)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:  # e.g. remote code: transformers' own path handles it
        return None
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return_freed_memory()
    state = {}
    for file in files:
        shard = safe_open(file, framework="pt", device="cpu", backend="pread")
        state.update((key, shard.get_slice(key)) for key in shard.keys())  # noqa: SIM118 - not iterable
    model = model_class.from_pretrained(None, config=config, state_dict=state, **kwargs)
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(name)
    return model


def return_freed_memory() -> None:
    """Have glibc hand freed buffers of 1 MiB and more back to the system at once (a fixed mmap threshold), so
    that converting weights one at a time does not leave their full-precision copies in the heap. No-op where
    the C library is not glibc."""
    import ctypes
    import ctypes.util

    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path) if path else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is not None:
        mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB


def load_base_model(spec: Backbone, tokenizer, device_map=None, low_host_memory: bool = False):
    """The base model alone, as ``spec`` loads it (from scratch, a local directory or the hub; 4-bit or not), with
    room for every token of ``tokenizer``: what inference needs, without preparing it for training.
    ``low_host_memory``: a 4-bit load reads and quantises one weight at a time (see :func:`_read_then_quantize`)."""
    if spec.attn_implementation == PACKED_ATTENTION:
        register_packed_attention()  # transformers must know the name before the model is built
    if spec.pretrained is None:
        if spec.quantization != "none":
            raise BackboneError("quantization: nf4 needs pretrained weights (set model.backbone.pretrained)")
        model = _tiny_model(spec, tokenizer)
    else:
        model = _pretrained_model(spec, device_map, low_host_memory)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def build_model(spec: Backbone, tokenizer, device_map=None):
    """Build the base model (from scratch, a local directory or the hub), quantise it, then add LoRA.

    Returns a ``PeftModel`` with the adapter ``spec.lora.adapter_name`` active, or the plain model when
    ``spec.lora`` is None (every parameter then trains).
    """
    model = load_base_model(spec, tokenizer, device_map)
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
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if metadata:
            (tmp / "lit_ft.json").write_text(json.dumps(metadata, indent=2))
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

    def load_spec(self) -> Backbone:
        """``self.backbone`` as this machine and strategy load it: the 4-bit storage dtype resolved (the compute
        dtype under FSDP), bfloat16 replaced where the GPU lacks it. What :func:`build_model` gets, and what an
        export records as the way its base was loaded."""
        from lightning.pytorch.strategies import FSDPStrategy

        trainer = getattr(self, "_trainer", None)
        fsdp = trainer is not None and isinstance(trainer.strategy, FSDPStrategy)
        spec = self.backbone
        if spec.quantization == "nf4":
            spec = replace(spec, quant_storage=quant_storage(spec, fsdp))
        return for_this_hardware(spec)

    def base_record(self):
        """How this module's base was loaded and its prompts rendered: the ``lit_ft_base.json`` of its exports."""
        from lit_ft.backbone.base_record import BaseRecord, data_prompt_format

        trainer = getattr(self, "_trainer", None)
        prompt_format, chat_template = data_prompt_format(getattr(trainer, "datamodule", None))
        return BaseRecord.of(self.load_spec(), prompt_format, chat_template, stage=type(self).__name__)
