"""``lit-ft estimate``: training memory of a config, from the config alone (meta-device model, no weights).

    lit-ft estimate --config configs/mistral7b_qlora_alpaca.yaml
    lit-ft estimate --config configs/sft.yaml --config configs/mistral7b_qlora_alpaca.yaml --supervised-fraction 0.4

The configs are merged by ``lit-ft fit``'s own parser (later ``--config`` files and dotted overrides apply); nothing
is instantiated. The shape comes from ``AutoConfig`` (local directory or hub cache), from TinyConfig when
``pretrained`` is null, or from :data:`KNOWN_CONFIGS` for hub ids that cannot be fetched (no network).

Per decoder layer and per token, the tensors autograd keeps for the backward pass (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1, re-derived for this architecture):

    GPT layer, 16-bit, no recomputation (the paper):  s*b*h*(34 + 5*a*s/h) bytes
    this Mistral layer (SwiGLU MLP, RMSNorm, GQA, LoRA on frozen linears), bytes per token:
        norms     2 * (4*h [+ rho*h when the norm weight trains])   RMSNorm keeps its fp32 input
        linears   saved inputs: a frozen linear keeps none, a LoRA or trainable one keeps its (cast) input:
                  q,k,v: 3 copies of c*h under autocast from a wider stream, else one shared copy (x3 with dropout)
                  gate,up: likewise; o_proj: c*h; down_proj: c*I; + 1 byte/element of dropout mask (CUDA)
        LoRA      7 * c * r (lora_A outputs)
        attention sdpa/flash: q + k + v + out = c*(2h + 2k_v) + 4*heads (logsumexp), with k_v = h when
                  transformers repeats the KV heads (sdpa with a mask: packed or padded rows), else kv width;
                  eager: c*(h + 2 k_v) + a*s*(4 + c) (fp32 softmax probabilities and their cast)
        SwiGLU    3 * c * I (gate output, SiLU output, up output)
    with h hidden, I intermediate, a heads, s row length, c the compute bytes (2 under bf16/fp16 autocast),
    rho the residual-stream bytes (4 for QLoRA: prepare_model_for_kbit_training casts norms and embeddings to
    fp32). For Mistral-7B QLoRA with sdpa on packed rows that is about 262 kB per token per layer.
    Gradient checkpointing (per decoder layer) keeps only each layer's input, rho*h per token per layer, and
    recomputes one layer at a time in the backward pass: L*rho*h*T + one layer's activations.

The loss (lit_ft.losses.lm.supervised_token_loss) projects only supervised positions through the head, in chunks of
``loss_chunk_size``. With the fused loss (gradients computed chunk by chunk in the forward pass) only
d loss/d hidden is kept, N_supervised x h; without it every chunk's fp32 log-softmax stays saved until backward,
N_supervised x vocab x 4 bytes, and the chunking bounds only the transient logits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
EMBEDDED_VOCAB = 32000  # the embedded Mistral-7B-v0.1 tokenizer (pad = unk, so no new token)
NF4_BLOCK = 64  # bitsandbytes 4-bit block size (QLoRA)
NESTED_BLOCK = 256  # double quantisation: 8-bit absmax in blocks of 256 with one fp32 absmax each
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context + kernels: ~0.3-0.6 GiB outside torch's allocator
FRAGMENTATION = 0.10  # torch's caching allocator typically reserves ~10% above the peak allocated

# Used when the hub config cannot be read (no network, empty cache). Sources: each model's config.json.
_MISTRAL_7B = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "tie_word_embeddings": False}
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "meta-llama/Llama-2-7b-hf": {**_MISTRAL_7B, "model_type": "llama", "intermediate_size": 11008,
                                 "num_key_value_heads": 32},
    "meta-llama/Meta-Llama-3-8B": {**_MISTRAL_7B, "model_type": "llama", "vocab_size": 128256},
}

# Optimiser state bytes per trainable parameter (fp32 parameters), by class name.
OPTIMIZER_STATE = {
    "AdamW": (8, "exp_avg + exp_avg_sq, fp32"), "Adam": (8, "exp_avg + exp_avg_sq, fp32"),
    "AdamW32bit": (8, "fp32 states"), "PagedAdamW": (8, "fp32 states in paged (unified) memory"),
    "PagedAdamW32bit": (8, "fp32 states in paged (unified) memory"),
    "AdamW8bit": (2, "8-bit blockwise states"), "Adam8bit": (2, "8-bit blockwise states"),
    "PagedAdamW8bit": (2, "8-bit blockwise states in paged (unified) memory"),
}


@dataclass
class ModelShape:
    """The sizes the estimate needs, read from a transformers config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    source: str = ""

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, config: Any, source: str = "") -> ModelShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   heads, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   bool(getattr(config, "tie_word_embeddings", False)), source)


@dataclass
class TrainingSetup:
    """Everything besides the model that sets the memory of a training step.

    Args:
        micro_batch_size: rows per forward pass (RM: pairs, doubled to rows by ``rows_per_sample``).
        seq_length: tokens per row (packed: max_seq_length; padded: the batch's longest, max_seq_length at worst).
        packing: packed rows (block-diagonal mask from position ids) or padded rows (attention mask).
        rows_per_sample: 2 for reward-model pairs (chosen and rejected in one pass), else 1.
        supervised_fraction: share of positions whose logits are kept for the loss (1.0: an upper bound; 0
            for a reward model, which reads one score per row).
        quantization: "nf4" or "none"; double_quant: NF4 with double quantisation (lit_ft always sets it).
        dtype_bytes: bytes of the non-quantised weights.
        compute_bytes: bytes of activations (2 under bf16/fp16 autocast).
        attn_implementation: sdpa, eager, flash_attention_2 or flex_attention.
        gradient_checkpointing: recompute each decoder layer in the backward pass.
        lora_r, lora_targets, lora_dropout: LoRA rank (None: every parameter trains), target modules ("all-linear"
            or names), dropout (>0 keeps a mask per adapted input).
        num_trainable_adapters: adapters that train at once (PPO: policy and value).
        num_frozen_adapters: extra frozen adapters in memory (PPO: reward, reference).
        head_params: trainable scalar heads (RM/PPO score and value heads).
        optimizer: optimiser class name (AdamW, PagedAdamW, AdamW8bit, SGD...).
        sgd_momentum: SGD momentum (0 keeps no state).
        loss_chunk_size: supervised positions per head projection (lit_ft.losses.lm).
        fused_loss: the loss computes each chunk's gradient in its forward pass (no logits kept for backward).
        full_logits_tokens: positions with full logits kept (PPO response tokens), besides the supervised ones.
        generation_tokens, generation_rows: tokens per row and rows of a generation KV cache (PPO rollout).
    """

    micro_batch_size: int = 4
    seq_length: int = 512
    packing: bool = True
    rows_per_sample: int = 1
    supervised_fraction: float = 1.0
    quantization: str = "none"
    double_quant: bool = True
    dtype_bytes: int = 4
    compute_bytes: int = 4
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    lora_r: int | None = 16
    lora_targets: str | list[str] = "all-linear"
    lora_dropout: float = 0.0
    num_trainable_adapters: int = 1
    num_frozen_adapters: int = 0
    head_params: int = 0
    optimizer: str = "AdamW"
    sgd_momentum: float = 0.0
    loss_chunk_size: int = 4096
    fused_loss: bool = True  # True: lit_ft.losses.lm fuses the loss for the plain linear heads of causal LMs
    full_logits_tokens: int = 0
    generation_tokens: int = 0
    generation_rows: int = 0

    @property
    def rows(self) -> int:
        return self.micro_batch_size * self.rows_per_sample

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_length


@dataclass
class Line:
    """One row of the breakdown: what, how many elements or parameters, bytes, and a note."""

    name: str
    count: int | None
    bytes: int
    note: str = ""
    in_total: bool = True
    paged: bool = False  # bitsandbytes paged (unified) memory: outside torch's allocator


@dataclass
class MemoryEstimate:
    """The breakdown and its totals (bytes)."""

    shape: ModelShape
    setup: TrainingSetup
    lines: list[Line] = field(default_factory=list)

    @property
    def allocated(self) -> int:
        """Peak of torch's allocator (``torch.cuda.max_memory_allocated``)."""
        return sum(line.bytes for line in self.lines if line.in_total and not line.paged)

    @property
    def paged(self) -> int:
        """Paged optimiser state (unified memory): on the device when it fits, not in torch's counters."""
        return sum(line.bytes for line in self.lines if line.in_total and line.paged)

    @property
    def reserved(self) -> int:
        """Peak reserved by the caching allocator (fragmentation included)."""
        return int(self.allocated * (1 + FRAGMENTATION))

    @property
    def device_total(self) -> int:
        """What the device shows in use (nvidia-smi): reserved plus the CUDA context."""
        return self.reserved + self.paged + CUDA_CONTEXT_BYTES

    def table(self) -> str:
        rows = [f"{'component':<44} {'count':>15} {'GiB':>9}  note", "-" * 110]
        for line in self.lines:
            count = f"{line.count:,}" if line.count is not None else ""
            mark = "" if line.in_total else " (not in total)"
            rows.append(f"{line.name:<44} {count:>15} {line.bytes / GIB:>9.3f}  {line.note}{mark}")
        rows.append("-" * 110)
        rows.append(f"{'peak allocated (torch allocator)':<44} {'':>15} {self.allocated / GIB:>9.2f}")
        rows.append(f"{'+ allocator fragmentation ~10% (reserved)':<44} {'':>15} {self.reserved / GIB:>9.2f}")
        if self.paged:
            rows.append(f"{'+ paged optimiser state':<44} {'':>15} {(self.reserved + self.paged) / GIB:>9.2f}")
        rows.append(f"{'+ CUDA context (device total)':<44} {'':>15} {self.device_total / GIB:>9.2f}")
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------------- the model
def hf_config(pretrained: str | None, tiny: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The transformers config of a backbone source, and where it came from. Never downloads weights."""
    from transformers import AutoConfig, LlamaConfig, MistralConfig

    if pretrained is None:
        from lit_ft.backbone import TinyConfig

        return MistralConfig(vocab_size=EMBEDDED_VOCAB, tie_word_embeddings=False,
                             **(asdict(TinyConfig()) if tiny is None else tiny)), "TinyConfig"
    from lit_ft.backbone import BackboneError, looks_local

    path = os.path.expanduser(pretrained)
    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path), f"{path}/config.json"
    if looks_local(pretrained):
        raise BackboneError(f"{pretrained}: model directory not found (`make pretrain` builds the embedded base)")
    try:  # the hub cache only: a network attempt takes ~25 s of retries when there is no network
        return AutoConfig.from_pretrained(pretrained, local_files_only=True), "hub cache"
    except (OSError, ValueError):
        pass
    if pretrained in KNOWN_CONFIGS:
        known = dict(KNOWN_CONFIGS[pretrained])
        cls = {"mistral": MistralConfig, "llama": LlamaConfig}[known.pop("model_type")]
        return cls(**known), "lit_ft.tools.estimate.KNOWN_CONFIGS"
    try:
        return AutoConfig.from_pretrained(pretrained), "hub"
    except (OSError, ValueError) as err:
        raise BackboneError(f"{pretrained}: cannot read its config ({str(err).splitlines()[0]}); known offline: "
                            f"{', '.join(KNOWN_CONFIGS)}") from None


def meta_model(config: Any):
    """The model on the meta device: shapes and parameter counts, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def lora_targets(model: Any, targets: str | list[str]) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the linear layers PEFT adapts: "all-linear" is every linear but
    the output head; a list matches module names by suffix; another string is a full-match regex (PEFT's rules)."""
    import torch

    head = model.get_output_embeddings()
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear":
            hit = True
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            found.append((name, module.in_features, module.out_features))
    return found


def lora_param_count(model: Any, r: int, targets: str | list[str]) -> int:
    """LoRA parameters PEFT adds: r * (in + out) per adapted linear (A is r x in, B is out x r)."""
    return sum(r * (i + o) for _, i, o in lora_targets(model, targets))


def nf4_bytes(numels: list[int], double_quant: bool = True) -> int:
    """Storage of 4-bit NF4 weights: two per byte, plus one absmax per block of 64.

    Without double quantisation each absmax is fp32 (0.5 bit/param); with it, 8-bit (0.125 bit/param) plus one
    fp32 absmax per 256 blocks and a per-tensor fp32 offset (QLoRA paper, Sec. 3; bitsandbytes QuantState).
    """
    total = 0
    for n in numels:
        blocks = math.ceil(n / NF4_BLOCK)
        total += math.ceil(n / 2)
        total += blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 if double_quant else 4 * blocks
    return total


# ----------------------------------------------------------------------------------------------- activations
def layer_activation_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """Bytes autograd keeps per token for one decoder layer (the formula in the module docstring)."""
    h, inter, a = shape.hidden_size, shape.intermediate_size, shape.num_heads
    c = setup.compute_bytes
    rho = 4 if setup.quantization == "nf4" else setup.dtype_bytes
    lora, full = setup.lora_r is not None, setup.lora_r is None
    dropout = lora and setup.lora_dropout > 0
    mask = 1 if dropout else 0
    cast = c != rho  # autocast makes one bf16 copy per linear from the fp32/wider stream

    def inputs(width: int, consumers: int, widened: bool) -> float:
        """Saved inputs of ``consumers`` linears that read one tensor of ``width`` (widened: from the stream)."""
        if not (lora or full):
            return 0.0
        copies = consumers if (widened and cast) or dropout else 1
        return copies * c * width + consumers * mask * width

    norms = 2 * (4 * h + (rho * h if full else 0))
    linears = (inputs(h, 3, True) + inputs(h, 1, False) + inputs(h, 2, True) + inputs(inter, 1, False))
    lora_mid = 7 * c * setup.lora_r * setup.num_trainable_adapters if lora else 0
    has_mask = setup.attn_implementation in ("sdpa", "eager") and (setup.packing or setup.rows > 1)
    kv = h if (setup.attn_implementation == "eager" or has_mask) else shape.kv_width  # repeat_kv copies
    if setup.attn_implementation == "eager":
        attention = c * (h + 2 * kv) + a * setup.seq_length * (4 + (c if c != 4 else 0))
    else:
        attention = c * (2 * h + 2 * kv) + 4 * a
    swiglu = 3 * c * inter
    return norms + linears + lora_mid + attention + swiglu


def activation_bytes(shape: ModelShape, setup: TrainingSetup, checkpointing: bool) -> int:
    """Activations of all decoder layers for one micro-batch, with or without gradient checkpointing."""
    rho = 4 if setup.quantization == "nf4" else setup.dtype_bytes
    per_layer = layer_activation_bytes(shape, setup) * setup.tokens
    final_norm = 4 * shape.hidden_size * setup.tokens
    if checkpointing:
        return int(shape.num_layers * rho * shape.hidden_size * setup.tokens + per_layer + final_norm)
    return int(shape.num_layers * per_layer + final_norm)


# --------------------------------------------------------------------------------------------------- estimate
def estimate(shape: ModelShape, setup: TrainingSetup, model: Any = None) -> MemoryEstimate:
    """The memory breakdown of one training step (see the module docstring for the activation formula)."""
    import torch

    if model is None:
        model = meta_model(_config_from_shape(shape))
    est = MemoryEstimate(shape, setup)
    lines = est.lines
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())  # parameters() yields shared tensors once
    quantized = [m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not head] if setup.quantization == "nf4" else []
    n_q = sum(quantized)
    lines.append(Line("parameters (base model)", total, 0, shape.source))
    if n_q:
        lines.append(Line("  NF4 4-bit linears, double quant", n_q, nf4_bytes(quantized, True),
                          "4 bits + 8-bit absmax/64 + fp32 absmax/16384", setup.double_quant))
        lines.append(Line("  NF4 4-bit linears, no double quant", n_q, nf4_bytes(quantized, False),
                          "4 bits + fp32 absmax per 64", not setup.double_quant))
        lines.append(Line("  fp32 embeddings, head, norms", total - n_q, 4 * (total - n_q),
                          "prepare_model_for_kbit_training casts them to fp32"))
    else:
        name = {2: "bf16/fp16", 4: "fp32"}.get(setup.dtype_bytes, f"{setup.dtype_bytes}-byte")
        lines.append(Line(f"  {name} weights", total, setup.dtype_bytes * total, "every parameter"))
    if setup.lora_r is not None:
        one = lora_param_count(model, setup.lora_r, setup.lora_targets)
        trainable = one * setup.num_trainable_adapters + setup.head_params
        lines.append(Line("trainable LoRA parameters (fp32)", trainable, 4 * trainable,
                          f"r={setup.lora_r} on {len(lora_targets(model, setup.lora_targets))} linears"
                          + (f" x {setup.num_trainable_adapters} adapters" if setup.num_trainable_adapters > 1
                             else "") + (f" + {setup.head_params:,} head" if setup.head_params else "")))
        if setup.num_frozen_adapters:
            frozen = one * setup.num_frozen_adapters
            lines.append(Line("frozen adapters (fp32)", frozen, 4 * frozen, "PPO reward/reference adapters"))
        grad_bytes = 4
    else:
        trainable = total + setup.head_params
        grad_bytes = setup.dtype_bytes
    lines.append(Line("gradients (trainable only)", trainable, grad_bytes * trainable, ""))
    lines.append(_optimizer_line(setup, trainable, grad_bytes))

    with_ckpt, without = activation_bytes(shape, setup, True), activation_bytes(shape, setup, False)
    rows = f"{setup.rows} rows x {setup.seq_length} ({'packed' if setup.packing else 'padded, worst case'})"
    lines.append(Line("activations, gradient checkpointing", setup.tokens, with_ckpt,
                      rows + (" <- in use" if setup.gradient_checkpointing else ""),
                      setup.gradient_checkpointing))
    lines.append(Line("activations, no checkpointing", setup.tokens, without,
                      f"{layer_activation_bytes(shape, setup) / 1024:.1f} kB/token/layer x {shape.num_layers} layers"
                      + ("" if setup.gradient_checkpointing else " <- in use"), not setup.gradient_checkpointing))
    if setup.attn_implementation in ("sdpa", "eager") and (setup.packing or setup.rows > 1):
        mask_bytes = setup.rows * setup.seq_length**2 * setup.compute_bytes
        lines.append(Line("attention mask (shared by layers)", None, mask_bytes, "rows x s x s additive mask"))
    linear = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not head)
    if not n_q and setup.compute_bytes < setup.dtype_bytes:
        lines.append(Line("autocast weight copies (saved)", linear, linear * setup.compute_bytes,
                          "each linear's weight cast once per forward, kept for the backward"))
    lines.extend(_logits_lines(shape, setup))
    if setup.generation_tokens:
        cache = (2 * shape.num_layers * shape.kv_width * setup.generation_tokens * setup.generation_rows
                 * setup.compute_bytes)
        lines.append(Line("generation KV cache (rollout)", setup.generation_rows, cache,
                          "freed before the update; the update's activations are larger here"
                          if cache < with_ckpt else "rollout phase", False))
    biggest = max((m.in_features * m.out_features for m in model.modules()
                   if isinstance(m, torch.nn.Linear) and m is not head), default=0)
    if n_q:
        lines.append(Line("dequantised weight (transient)", biggest, 2 * biggest * setup.compute_bytes,
                          "largest linear in compute dtype, twice (forward + backward)"))
    return est


def _optimizer_line(setup: TrainingSetup, trainable: int, param_bytes: int) -> Line:
    name = setup.optimizer
    if name == "SGD":
        per = 4 if setup.sgd_momentum else 0
        note = "momentum buffer, fp32" if per else "no state without momentum"
    elif name in OPTIMIZER_STATE:
        per, note = OPTIMIZER_STATE[name]
        if per == 8:
            per = 2 * param_bytes
    else:
        per, note = 2 * param_bytes, f"{name}: unknown, assumed Adam-like (two states)"
    if name.startswith("Paged"):
        note += "; outside torch's allocator, may spill to CPU"
    return Line(f"optimiser states ({name})", trainable, per * trainable, note, paged=name.startswith("Paged"))


def _logits_lines(shape: ModelShape, setup: TrainingSetup) -> list[Line]:
    vocab, h, c = shape.vocab_size, shape.hidden_size, setup.compute_bytes
    rho = 4 if setup.quantization == "nf4" else setup.dtype_bytes
    supervised = int(setup.supervised_fraction * setup.rows * max(setup.seq_length - 1, 1))
    lines = []
    if supervised:
        chunk = min(setup.loss_chunk_size, supervised)
        cast = c < 4  # autocast: the fp32 head's weight is cast to the compute dtype for every chunk
        if setup.fused_loss:
            lines.append(Line("loss gradient kept (fused loss)", supervised,  # + the bool selection mask
                              supervised * h * rho + setup.rows * max(setup.seq_length - 1, 1),
                              "d loss/d hidden per supervised position (+ the selection mask)"))
            if setup.lora_r is None:
                lines.append(Line("head weight gradient (fused loss)", vocab * h, vocab * h * 4, "fp32"))
            lines.append(Line("one chunk's logits (transient)", chunk,
                              chunk * vocab * (4 + (2 * c if cast else 0)) + (2 * vocab * h * c if cast else 0),
                              f"loss_chunk_size={setup.loss_chunk_size}: fp32 logits/softmax"
                              + (", bf16 copies and two head casts" if cast else "")))
        else:
            lines.extend(_unfused_loss_lines(setup, supervised, chunk, vocab, h))
    if setup.full_logits_tokens:
        n = setup.full_logits_tokens
        lines.append(Line("response logits (PPO, fp32)", n, 12 * n * vocab, "logits/T, log-softmax, entropy"))
    return lines


def _unfused_loss_lines(setup: TrainingSetup, supervised: int, chunk: int, vocab: int, h: int) -> list[Line]:
    """Without the fused loss every chunk's log-softmax is kept until backward."""
    c, chunks = setup.compute_bytes, math.ceil(supervised / chunk)
    copies = chunks if setup.lora_r is not None else 1  # autocast caches casts of trainable leaves only
    return [Line("log-softmax kept for backward (fp32)", supervised, supervised * 4 * vocab + setup.rows * (setup.seq_length - 1),
                 f"supervised positions x vocab x 4 (fraction {setup.supervised_fraction:g}); "
                 f"all {chunks} chunk(s) stay saved"),
            Line("logits + grads of one chunk (transient)", chunk, chunk * vocab * (4 + 4 + c),
                 f"loss_chunk_size={setup.loss_chunk_size}: fp32 logits, fp32 and {c}-byte grads")] + (
        [Line("head weight cast per chunk (autocast)", copies * vocab * h, copies * vocab * h * c,
              "the frozen fp32 head, re-cast per chunk" if copies > 1 else "autocast's cached cast")]
        if c < 4 else [])


def _config_from_shape(s: ModelShape) -> Any:
    from transformers import MistralConfig

    return MistralConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                         num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim, tie_word_embeddings=s.tied_embeddings)


# ------------------------------------------------------------------------------------------ config to setup
def parse_config(argv: list[str]) -> dict[str, Any]:
    """The merged ``fit`` config as a plain dict, through LitFtCLI's own parser (nothing instantiated)."""
    from lit_ft.cli import LitFtCLI

    class _ParseOnly(LitFtCLI):
        def _set_seed(self) -> None:  # no side effects: nothing runs
            pass

        def instantiate_classes(self) -> None:
            pass

    with warnings.catch_warnings(action="ignore"):  # "args and sys.argv both given": argv is ours
        cli = _ParseOnly(args=argv, run=False)
    return cli.config.as_dict()


def _value(node: Any, *keys: str, default: Any = None) -> Any:
    """``node[k1][k2]...``, stepping through ``init_args`` where a class_path node holds them."""
    for key in keys:
        if not isinstance(node, dict):
            return default
        node = node.get("init_args", node) if key not in node and "init_args" in node else node
        node = node.get(key, default) if isinstance(node, dict) else default
    return default if node is None else node


def setup_from_config(config: dict[str, Any], supervised_fraction: float | None = None,
                      seq_length: int | None = None) -> tuple[TrainingSetup, dict[str, Any]]:
    """A :class:`TrainingSetup` and the backbone dict from a merged config."""
    model, data, trainer = (config.get(k) or {} for k in ("model", "data", "trainer"))
    model_class = str(model.get("class_path", ""))
    backbone = _value(model, "backbone", default={}) or {}
    lora = backbone.get("lora")
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[backbone.get("dtype") or "float32"]
    half = "16" in str(trainer.get("precision") or "32-true").replace("32", "")  # bf16-mixed, 16-true, ...
    optimizer = _value(model, "optimizer", default={})
    opt_name = (optimizer.get("class_path", "AdamW") if isinstance(optimizer, dict) else "AdamW").rsplit(".")[-1]
    momentum = float(_value(optimizer, "momentum", default=0.0)) if isinstance(optimizer, dict) else 0.0
    setup = TrainingSetup(
        quantization=backbone.get("quantization") or "none",
        dtype_bytes=dtype_bytes, compute_bytes=2 if half else dtype_bytes,
        attn_implementation=backbone.get("attn_implementation") or "sdpa",
        gradient_checkpointing=bool(backbone.get("gradient_checkpointing")),
        lora_r=lora.get("r", 16) if lora else None, lora_targets=(lora or {}).get("target_modules", "all-linear"),
        lora_dropout=float((lora or {}).get("dropout", 0.0)), optimizer=opt_name, sgd_momentum=momentum,
        loss_chunk_size=int(_value(model, "loss_chunk_size", default=4096)),
    )
    _adapter_config(setup, backbone.get("init_adapter"))
    batch = int(_value(data, "micro_batch_size", default=4))
    if model_class.endswith("PPO"):
        prompt = int(_value(data, "max_prompt_length", default=256))
        new = int(_value(model, "max_new_tokens", default=16))
        setup.micro_batch_size = int(_value(model, "forward_batch_size", default=8))
        setup.seq_length, setup.packing, setup.supervised_fraction = prompt + new, False, 0.0
        setup.num_trainable_adapters, setup.head_params = 2, 0
        setup.num_frozen_adapters = (1 if _value(model, "reward_model") else 0) + (
            1 if _value(model, "reference", default="base") == "adapter" else 0)
        setup.full_logits_tokens = setup.micro_batch_size * new
        setup.generation_tokens, setup.generation_rows = prompt + new, batch
    else:
        setup.micro_batch_size, setup.seq_length = batch, int(_value(data, "max_seq_length", default=512))
        setup.packing = bool(_value(data, "packing", default=not model_class.endswith("RewardModel")))
        if model_class.endswith("RewardModel"):
            setup.rows_per_sample, setup.supervised_fraction, setup.packing = 2, 0.0, False
    if supervised_fraction is not None and setup.supervised_fraction:
        setup.supervised_fraction = supervised_fraction
    if seq_length is not None:
        setup.seq_length = seq_length
    return setup, backbone


def _adapter_config(setup: TrainingSetup, directory: str | None) -> None:
    """An existing init adapter brings its own r and targets (as lit_ft.backbone.build_model does)."""
    path = Path(directory or "") / "adapter_config.json"
    if directory and path.exists():
        saved = json.loads(path.read_text())
        setup.lora_r = saved.get("r", setup.lora_r)
        targets = saved.get("target_modules", setup.lora_targets)
        setup.lora_targets = sorted(targets) if isinstance(targets, (list, set)) else targets


def main(argv: list[str] | None = None) -> None:
    """``lit-ft estimate --config CONFIG [--config CONFIG ...] [overrides]``: print the memory breakdown."""
    parser = argparse.ArgumentParser(
        prog="lit-ft estimate", description="Training memory of a config, from the config alone.",
        epilog="Every other option (--config, --model.init_args...) goes to the lit-ft fit parser.")
    parser.add_argument("--supervised-fraction", type=float, default=None,
                        help="share of positions with a loss (default 1.0: an upper bound; Alpaca is ~0.4)")
    parser.add_argument("--sequence-length", type=int, default=None,
                        help="row length to estimate for (default: data max_seq_length)")
    parser.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    config = parse_config(rest)
    setup, backbone = setup_from_config(config, own.supervised_fraction, own.sequence_length)
    hf, source = hf_config(backbone.get("pretrained"), backbone.get("tiny"))
    shape = ModelShape.from_hf(hf, source)
    model_class = str((config.get("model") or {}).get("class_path", ""))
    if model_class.endswith(("RewardModel", "PPO")):  # the score head (RM) or the value head (PPO)
        setup.head_params = shape.hidden_size + 1
    est = estimate(shape, setup, meta_model(hf))
    if own.json:
        return print(json.dumps({"lines": [asdict(x) for x in est.lines], "allocated": est.allocated, "reserved":
                                 est.reserved, "shape": asdict(shape), "setup": asdict(setup)}, indent=1))
    print(f"lit-ft estimate: {backbone.get('pretrained') or 'TinyConfig'} ({source}), {model_class or 'model'}; "
          f"{shape.num_layers} layers, hidden {shape.hidden_size}, MLP {shape.intermediate_size}, "
          f"{shape.num_heads} heads / {shape.num_kv_heads} KV, vocab {shape.vocab_size:,}\nquantization "
          f"{setup.quantization}, compute {8 * setup.compute_bytes}-bit, attention {setup.attn_implementation}, "
          f"micro-batch {setup.micro_batch_size} x {setup.seq_length}{' packed' if setup.packing else ' padded'}, "
          f"optimizer {setup.optimizer}\n{est.table()}")
    print(f"(estimated in {time.perf_counter() - start:.1f} s; formula and assumptions: pydoc lit_ft.tools.estimate)")

