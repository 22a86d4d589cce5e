"""The memory model behind ``lit-ft estimate`` (lit_ft.tools.estimate): the bytes of one training step, from a
model's shape and the training settings, phase by phase.

Per decoder layer and per token, the tensors autograd keeps for the backward pass (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1, re-derived for this architecture):

    GPT layer, 16-bit, no recomputation (the paper):  s*b*h*(34 + 5*a*s/h) bytes
    this Mistral layer (SwiGLU MLP, RMSNorm, GQA, LoRA on frozen linears), bytes per token:
        norms     2 * (4*h [+ rho*h when the norm weight trains])   RMSNorm keeps its input in fp32
        linears   saved inputs of the LoRA-targeted (or, without LoRA, every trainable) linears only; a frozen one
                  keeps none. Each keeps its input in the compute dtype: one copy per linear when the input must
                  be cast (a wider stream under autocast) or LoRA dropout makes one, else one copy shared by the
                  linears that read it (q,k,v; gate,up); + 1 byte/element of dropout mask (CUDA)
        LoRA      c * r per targeted linear (lora_A outputs)
        attention sdpa/flash: q + k + v + out = c*(2h + 2k_v) + 4*heads (logsumexp), with k_v = h when
                  transformers repeats the KV heads (sdpa with a mask: packed or padded rows), else kv width;
                  eager: c*(h + 2 k_v) + a*s*(4 + c) (fp32 softmax probabilities and their cast)
        SwiGLU    3 * o * I (gate output, SiLU output, up output)
    with h hidden, I intermediate, a heads, s row length, c the compute bytes (2 under bf16/fp16 autocast), rho
    the residual-stream bytes and o the bytes of a linear's output. The dtypes follow what really flows: on the
    NF4 path lit_ft's lean preparation keeps embeddings, norms and head in the 4-bit compute dtype (so rho is its
    bytes), and bitsandbytes returns each 4-bit linear's output in its input's dtype (o = rho); an unquantised
    linear under autocast returns the compute dtype (o = c). For the Mistral-7B recipe (NF4, bf16, LoRA on all
    linears, dropout 0.05, sdpa on packed rows) that is about 270 kB per token per layer.
    Gradient checkpointing (per decoder layer) keeps only each layer's input, rho*h per token per layer, and
    recomputes one layer at a time in the backward pass: L*rho*h*T + one layer's activations.

The loss (lit_ft.losses.lm.supervised_token_loss) projects only supervised positions through the head, in chunks of
``loss_chunk_size``. With the fused loss (gradients computed chunk by chunk in the forward pass) only
d loss/d hidden is kept, N_supervised x h in the stream's dtype, and one chunk's logits exist at a time: in the
matmul's dtype, widened to fp32 for the log-sum-exp (chunk x vocab x (4 + c)); without it every chunk's fp32
log-softmax stays saved until backward, N_supervised x vocab x 4 bytes, and the chunking bounds only the transient
logits.

The peak: what lives throughout (weights, adapters, gradients, optimiser state, the checkpointed layer inputs, the
mask, one dequantised weight) plus the larger of two phases: the end of the forward pass (the final norm's input,
autocast's weight copies, the loss's kept gradient and one chunk of logits) and the backward pass of the first
recomputed layer (its activations and the gradients in flight in it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

GIB = 1024**3
Phase = Literal["both", "forward", "backward"]
NF4_BLOCK = 64  # bitsandbytes 4-bit block size (QLoRA)
NESTED_BLOCK = 256  # double quantisation: 8-bit absmax in blocks of 256 with one fp32 absmax each
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context + kernels: ~0.3-0.6 GiB outside torch's allocator
FRAGMENTATION = 0.10  # torch's caching allocator typically reserves ~10% above the peak allocated

# Optimiser state per trainable parameter, by class name: (number of states, bytes per state or None for the
# parameter's dtype, note). torch's Adam/AdamW/SGD keep their states in the parameter's dtype; bitsandbytes' 32-bit
# optimisers keep fp32 states whatever the parameter's dtype, its 8-bit ones blockwise 8-bit states.
OPTIMIZER_STATE: dict[str, tuple[int, int | None, str]] = {
    "AdamW": (2, None, "exp_avg + exp_avg_sq, parameter dtype"),
    "Adam": (2, None, "exp_avg + exp_avg_sq, parameter dtype"),
    "SGD": (1, None, "momentum buffer, parameter dtype"),
}
BNB_OPTIMIZER_STATE: dict[str, tuple[int, int | None, str]] = {
    "AdamW": (2, 4, "bitsandbytes 32-bit: fp32 states"), "Adam": (2, 4, "bitsandbytes 32-bit: fp32 states"),
    "AdamW32bit": (2, 4, "fp32 states"), "Adam32bit": (2, 4, "fp32 states"),
    "PagedAdamW": (2, 4, "fp32 states in paged (unified) memory"),
    "PagedAdamW32bit": (2, 4, "fp32 states in paged (unified) memory"),
    "PagedAdam": (2, 4, "fp32 states in paged (unified) memory"),
    "AdamW8bit": (2, 1, "8-bit blockwise states"), "Adam8bit": (2, 1, "8-bit blockwise states"),
    "PagedAdamW8bit": (2, 1, "8-bit blockwise states in paged (unified) memory"),
}
# The per-layer linears of the Mistral/Llama decoder, by the name PEFT matches: (name, input, module path).
LAYER_LINEARS = (("q_proj", "h", "self_attn"), ("k_proj", "h", "self_attn"), ("v_proj", "h", "self_attn"),
                 ("o_proj", "h", "self_attn"), ("gate_proj", "h", "mlp"), ("up_proj", "h", "mlp"),
                 ("down_proj", "I", "mlp"))


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
        dtype_bytes: bytes of the non-quantised weights as loaded (``Backbone.dtype``).
        compute_bytes: bytes of the matmuls' activations (2 under bf16/fp16 autocast).
        quant_compute_bytes: bytes of ``Backbone.compute_dtype``: the 4-bit matmuls' dtype and, on the NF4 path
            (lit_ft's lean preparation), the dtype of the embeddings, norms and head, so of the residual stream.
        kbit_preparation: "lean" (lit_ft.backbone.build_model) or "peft" (``peft.prepare_model_for_kbit_training``,
            which up-casts embeddings, norms and head to fp32: lit_ft's path before docs/memory.md, for comparison).
        attn_implementation: sdpa, eager, flash_attention_2 or flex_attention.
        gradient_checkpointing: recompute each decoder layer in the backward pass.
        lora_r, lora_targets, lora_dropout: LoRA rank (None: every parameter trains), target modules ("all-linear"
            or names), dropout (>0 keeps a mask per adapted input).
        num_trainable_adapters: adapters that train at once (PPO: policy and value).
        num_frozen_adapters: extra frozen adapters in memory (PPO: reward, reference).
        head_params: trainable scalar heads (RM/PPO score and value heads).
        optimizer: optimiser class name or path (AdamW, bitsandbytes.optim.PagedAdamW, AdamW8bit, SGD...); a
            path under ``bitsandbytes`` (or a name only bitsandbytes has: Paged*, *8bit, *32bit) is bitsandbytes'.
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
    quant_compute_bytes: int = 2
    kbit_preparation: Literal["lean", "peft"] = "lean"
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
    loss_chunk_size: int = 1024  # lit_ft.losses.lm.DEFAULT_CHUNK_SIZE
    fused_loss: bool = True  # True: lit_ft.losses.lm fuses the loss for the plain linear heads of causal LMs
    full_logits_tokens: int = 0
    generation_tokens: int = 0
    generation_rows: int = 0

    @property
    def rows(self) -> int:
        return self.micro_batch_size * self.rows_per_sample

    @property
    def stream_bytes(self) -> int:
        """The residual stream's dtype: the non-quantised weights' (NF4: the compute dtype, lean preparation)."""
        if self.quantization != "nf4":
            return self.dtype_bytes
        return 4 if self.kbit_preparation == "peft" else self.quant_compute_bytes

    @property
    def linear_out_bytes(self) -> int:
        """A frozen linear's output: bitsandbytes returns its input's dtype; torch's linear the autocast dtype."""
        return self.stream_bytes if self.quantization == "nf4" else self.compute_bytes

    @property
    def optimizer_name(self) -> str:
        return self.optimizer.rsplit(".", 1)[-1]

    @property
    def bnb_optimizer(self) -> bool:
        name = self.optimizer_name
        return self.optimizer.startswith("bitsandbytes") or name.startswith("Paged") or name.endswith(("8bit", "32bit"))

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
    phase: Phase = "both"  # when it is alive: throughout, at the end of the forward pass, or in the backward pass


@dataclass
class MemoryEstimate:
    """The breakdown and its totals (bytes)."""

    shape: ModelShape
    setup: TrainingSetup
    lines: list[Line] = field(default_factory=list)

    def phase_bytes(self, phase: Phase) -> int:
        return sum(x.bytes for x in self.lines if x.in_total and not x.paged and x.phase == phase)

    @property
    def allocated(self) -> int:
        """Peak of torch's allocator (``torch.cuda.max_memory_allocated``): what lives throughout, plus the larger
        of the forward pass's end and the backward pass."""
        return self.phase_bytes("both") + max(self.phase_bytes("forward"), self.phase_bytes("backward"))

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
            phase = {"both": "", "forward": "[forward] ", "backward": "[backward] "}[line.phase]
            rows.append(f"{line.name:<44} {count:>15} {line.bytes / GIB:>9.3f}  {phase}{line.note}{mark}")
        rows.append("-" * 110)
        forward, backward = self.phase_bytes("forward"), self.phase_bytes("backward")
        rows.append(f"{'throughout':<44} {'':>15} {self.phase_bytes('both') / GIB:>9.2f}")
        rows.append(f"{'+ the larger phase: forward end / backward':<44} {'':>15} "
                    f"{max(forward, backward) / GIB:>9.2f}  forward {forward / GIB:.2f}, backward {backward / GIB:.2f}")
        rows.append(f"{'peak allocated (torch allocator)':<44} {'':>15} {self.allocated / GIB:>9.2f}")
        rows.append(f"{'+ allocator fragmentation ~10% (reserved)':<44} {'':>15} {self.reserved / GIB:>9.2f}")
        if self.paged:
            rows.append(f"{'+ paged optimiser state':<44} {'':>15} {(self.reserved + self.paged) / GIB:>9.2f}")
        rows.append(f"{'+ CUDA context (device total)':<44} {'':>15} {self.device_total / GIB:>9.2f}")
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------------- the model
def meta_model(config: Any):
    """The model on the meta device: shapes and parameter counts, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _peft_matches(name: str, targets: str | list[str]) -> bool:
    """PEFT's rule: "all-linear" matches every linear (the head is excluded by the caller); a list matches module
    names by suffix; another string is a full-match regex."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_targets(model: Any, targets: str | list[str]) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the linear layers PEFT adapts (every linear but the output head that
    :func:`_peft_matches` the targets)."""
    import torch

    head = model.get_output_embeddings()
    return [(name, module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head and _peft_matches(name, targets)]


def targeted_linears(setup: TrainingSetup) -> set[str]:
    """Which of a decoder layer's seven linears keep their input for the backward pass: the LoRA targets, or all
    of them when every parameter trains (``lora_r`` None)."""
    return {name for name, _, block in LAYER_LINEARS
            if setup.lora_r is None or _peft_matches(f"model.layers.0.{block}.{name}", setup.lora_targets)}


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
    c, rho, o = setup.compute_bytes, setup.stream_bytes, setup.linear_out_bytes
    full = setup.lora_r is None
    dropout = not full and setup.lora_dropout > 0
    mask = 1 if dropout else 0
    kept = targeted_linears(setup)

    # PEFT's LoRA on a torch linear casts its input to the fp32 LoRA weights' dtype first, which autocast then casts
    # back: a copy per linear. Its 4-bit LoRA skips that cast under autocast.
    plain_lora = not full and setup.quantization != "nf4" and c != 4

    def copied(in_bytes: int) -> bool:
        """Whether each linear keeps its own copy of its input (autocast's, dropout's or PEFT's casts)."""
        return in_bytes != c or dropout or plain_lora

    def inputs(names: tuple[str, ...], width: int, in_bytes: int) -> float:
        """Saved inputs of the kept linears among ``names``, which all read one tensor of ``width`` elements."""
        consumers = len(kept.intersection(names))
        if not consumers:
            return 0.0
        copies = consumers if copied(in_bytes) else 1
        return copies * c * width + consumers * mask * width

    norms = 2 * (4 * h + 4 + (rho * h if full else 0))  # fp32 input and its rsqrt
    # sdpa and flash save their output laid out as o_proj's input (lit_ft_packed concatenates per-example outputs)
    fused_out = setup.attn_implementation in ("sdpa", "flash_attention_2")
    o_input = 0.0 if fused_out and not copied(c) else inputs(("o_proj",), h, c)  # else shared with that output
    linears = (inputs(("q_proj", "k_proj", "v_proj"), h, rho) + o_input + inputs(("gate_proj", "up_proj"), h, rho)
               + inputs(("down_proj",), inter, o))
    lora_mid = len(kept) * c * setup.lora_r * setup.num_trainable_adapters if not full else 0
    kv = h if (setup.attn_implementation == "eager" or _has_mask(setup)) else shape.kv_width  # repeat_kv copies
    if setup.attn_implementation == "eager":
        attention = c * (h + 2 * kv) + a * setup.seq_length * (4 + (c if c != 4 else 0))
    else:  # q, k, v, out, logsumexp; with a mask, SDPA converts it to the compute dtype and saves it per layer
        attention = c * (2 * h + 2 * kv) + 4 * a + (setup.seq_length * c if _has_mask(setup) else 0)
    swiglu = 3 * o * inter
    return norms + linears + lora_mid + attention + swiglu


def _has_mask(setup: TrainingSetup) -> bool:
    """Whether transformers passes a (rows, 1, s, s) mask to the attention: packed or padded rows under sdpa/eager."""
    return setup.attn_implementation in ("sdpa", "eager") and (setup.packing or setup.rows > 1)


def activation_bytes(shape: ModelShape, setup: TrainingSetup, checkpointing: bool) -> int:
    """Activations of all decoder layers for one micro-batch, with or without gradient checkpointing."""
    rho = setup.stream_bytes
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
        q = setup.stream_bytes
        lines.append(Line(f"  {_dtype_name(q)} embeddings, head, norms", total - n_q, q * (total - n_q),
                          "up-cast by peft.prepare_model_for_kbit_training" if setup.kbit_preparation == "peft"
                          else "kept in the compute dtype (lit_ft's lean 4-bit preparation)"))
    else:
        lines.append(Line(f"  {_dtype_name(setup.dtype_bytes)} weights", total, setup.dtype_bytes * total, "every parameter"))
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
    ckpt = setup.gradient_checkpointing
    lines.append(Line("activations, gradient checkpointing", setup.tokens, with_ckpt,
                      rows + (" <- in use, split below" if ckpt else ""), False))
    per_layer = layer_activation_bytes(shape, setup)
    lines.append(Line("activations, no checkpointing", setup.tokens, without,
                      f"{per_layer / 1024:.1f} kB/token/layer x {shape.num_layers} layers"
                      + ("" if ckpt else " <- in use, split below"), False))
    h, tokens = shape.hidden_size, setup.tokens
    if ckpt:
        lines.append(Line("  checkpointed layer inputs", tokens, shape.num_layers * setup.stream_bytes * h * tokens,
                          f"{_dtype_name(setup.stream_bytes)} residual stream, one per layer"))
        lines.append(Line("  one recomputed layer's activations", tokens, int(per_layer * tokens),
                          "the layer being back-propagated", phase="backward"))
    else:
        lines.append(Line("  every layer's activations", tokens, int(shape.num_layers * per_layer * tokens), ""))
    lines.append(Line("  final norm input (fp32)", tokens, 4 * h * tokens, "consumed first in the backward pass",
                      phase="forward"))
    lines.append(Line("  one layer's gradients in flight", tokens,
                      tokens * (2 * shape.intermediate_size * setup.linear_out_bytes + h * setup.stream_bytes),
                      "SwiGLU backward: two I-wide gradients at once, and the layer output's", phase="backward"))
    if _has_mask(setup):
        eager = setup.attn_implementation == "eager"
        mask_bytes = setup.rows * setup.seq_length**2 * (setup.stream_bytes if eager else 1)
        lines.append(Line("attention mask (shared by layers)", None, mask_bytes,
                          "rows x s x s " + ("additive mask" if eager else "boolean mask")))
    linear = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not head)
    copies = "forward" if ckpt else "both"  # with checkpointing, the recomputed layer re-casts its own
    if not n_q and setup.compute_bytes < setup.dtype_bytes:
        lines.append(Line("autocast weight copies (saved)", linear, linear * setup.compute_bytes,
                          "each linear's weight cast once per forward, kept for the backward", phase=copies))
    if setup.lora_r is not None and setup.compute_bytes < 4:
        lora = trainable - setup.head_params
        lines.append(Line("autocast copies of LoRA weights (saved)", lora, lora * setup.compute_bytes,
                          "fp32 LoRA weights cast once per forward (autocast's cache), kept for the backward",
                          phase=copies))
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
        lines.append(Line("dequantised weight (transient)", biggest, biggest * setup.quant_compute_bytes,
                          "largest linear in the 4-bit compute dtype, one at a time (forward or backward)"))
    return est


def _dtype_name(nbytes: int) -> str:
    return {2: "bf16/fp16", 4: "fp32"}.get(nbytes, f"{nbytes}-byte")


def _optimizer_line(setup: TrainingSetup, trainable: int, param_bytes: int) -> Line:
    """Optimiser state: torch's in the parameter dtype, bitsandbytes' 32-bit in fp32, its 8-bit in 8 bits."""
    name, bnb = setup.optimizer_name, setup.bnb_optimizer
    table = BNB_OPTIMIZER_STATE if bnb else OPTIMIZER_STATE
    if name == "SGD" and not setup.sgd_momentum:
        states, size, note = 0, None, "no state without momentum"
    elif name in table:
        states, size, note = table[name]
    else:
        states, size, note = 2, None, f"{name}: unknown, assumed Adam-like (two states in the parameter dtype)"
    per = states * (param_bytes if size is None else size)
    paged = bnb and name.startswith("Paged")
    if paged:
        note += "; outside torch's allocator, may spill to CPU"
    return Line(f"optimiser states ({name})", trainable, per * trainable, note, paged=paged)


def _logits_lines(shape: ModelShape, setup: TrainingSetup) -> list[Line]:
    vocab, h, c, rho = shape.vocab_size, shape.hidden_size, setup.compute_bytes, setup.stream_bytes
    supervised = int(setup.supervised_fraction * setup.rows * max(setup.seq_length - 1, 1))
    lines = []
    if supervised:
        chunk = min(setup.loss_chunk_size, supervised)
        cast = rho > c  # autocast narrower than the head: its weight is cast for every chunk (not cached: frozen)
        if setup.fused_loss:
            lines.append(Line("loss gradient kept (fused loss)", supervised,  # + the bool selection mask
                              supervised * h * rho + setup.rows * max(setup.seq_length - 1, 1),
                              f"d loss/d hidden per supervised position, {_dtype_name(rho)} (+ the selection mask)"))
            if setup.lora_r is None:
                lines.append(Line("head weight gradient (fused loss)", vocab * h, vocab * h * 4, "fp32"))
            lines.append(Line("one chunk's logits (transient)", chunk,
                              chunk * vocab * (4 + (c if c < 4 else 0)) + (vocab * h * c if cast else 0),
                              f"loss_chunk_size={setup.loss_chunk_size}: fp32 log-softmax"
                              + (f" + its {_dtype_name(c)} copy" if c < 4 else "") + (", a head cast" if cast else "")))
        else:
            lines.extend(_unfused_loss_lines(setup, supervised, chunk, vocab, h))
    if setup.full_logits_tokens:
        n = setup.full_logits_tokens
        lines.append(Line("response logits (PPO, fp32)", n, 12 * n * vocab, "logits/T, log-softmax, entropy"))
    for line in lines:  # the loss's own backward runs first and frees them before any layer's
        line.phase = "forward"
    return lines


def _unfused_loss_lines(setup: TrainingSetup, supervised: int, chunk: int, vocab: int, h: int) -> list[Line]:
    """Without the fused loss every chunk's log-softmax is kept until backward."""
    c, chunks = setup.compute_bytes, math.ceil(supervised / chunk)
    copies = chunks if setup.lora_r is not None else 1  # autocast caches casts of trainable leaves only
    return [Line("log-softmax kept for backward (fp32)", supervised,
                 supervised * 4 * vocab + setup.rows * (setup.seq_length - 1),
                 f"supervised positions x vocab x 4 (fraction {setup.supervised_fraction:g}); "
                 f"all {chunks} chunk(s) stay saved"),
            Line("logits + grads of one chunk (transient)", chunk, chunk * vocab * (4 + 4 + c),
                 f"loss_chunk_size={setup.loss_chunk_size}: fp32 logits, fp32 and {c}-byte grads")] + (
        [Line("head weight cast per chunk (autocast)", copies * vocab * h, copies * vocab * h * c,
              "the frozen head, re-cast per chunk" if copies > 1 else "autocast's cached cast")]
        if setup.stream_bytes > c else [])


def _config_from_shape(s: ModelShape) -> Any:
    from transformers import MistralConfig

    return MistralConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                         num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim, tie_word_embeddings=s.tied_embeddings)
