"""``lit-ft estimate``: training memory of a config, from the config alone (meta-device model, no weights).

    lit-ft estimate --config configs/mistral7b_qlora_alpaca.yaml
    lit-ft estimate --config configs/sft.yaml --config configs/mistral7b_qlora_alpaca.yaml --supervised_fraction 0.4

The configs are merged by ``lit-ft fit``'s own parser (later ``--config`` files and dotted overrides apply); nothing
is instantiated. The shape comes from ``AutoConfig`` (local directory or hub cache), from TinyConfig when
``pretrained`` is null, or from :data:`KNOWN_CONFIGS` for hub ids that cannot be fetched (no network).

The memory model (the formula, the phases) is :mod:`lit_ft.tools.memory_model`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lit_ft.cli import ToolParser
from lit_ft.tools.memory_model import GIB, MemoryEstimate, ModelShape, TrainingSetup, estimate, meta_model

# The model's main names are read from here too (callers of the tool before the model had its own module).
__all__ = ["GIB", "KNOWN_CONFIGS", "MemoryEstimate", "ModelShape", "TrainingSetup", "estimate", "hf_config", "main",
           "meta_model", "parse_config", "setup_from_config"]

EMBEDDED_VOCAB = 32000  # the embedded Mistral-7B-v0.1 tokenizer (pad = unk, so no new token)

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

# ------------------------------------------------------------------------------------------------- the model
def hf_config(pretrained: str | None, tiny: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The transformers config of a backbone source, and where it came from. Never downloads weights."""
    from transformers import AutoConfig, LlamaConfig, MistralConfig

    if pretrained in (None, "None", "null"):  # `--model.init_args.backbone.pretrained null` parses to "None"
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
    nbytes = {"float32": 4, "bfloat16": 2, "float16": 2}
    dtype_bytes = nbytes[backbone.get("dtype") or "float32"]
    quant_bytes = nbytes[backbone.get("compute_dtype") or "bfloat16"]
    quantization = backbone.get("quantization") or "none"
    half = "16" in str(trainer.get("precision") or "32-true").replace("32", "")  # bf16-mixed, 16-true, ...
    optimizer = _value(model, "optimizer", default={})
    opt_path = optimizer.get("class_path", "AdamW") if isinstance(optimizer, dict) else "AdamW"
    momentum = float(_value(optimizer, "momentum", default=0.0)) if isinstance(optimizer, dict) else 0.0
    setup = TrainingSetup(
        quantization=quantization, dtype_bytes=dtype_bytes, quant_compute_bytes=quant_bytes,
        # without autocast the activations are in the stream's dtype (NF4: the 4-bit compute dtype)
        compute_bytes=2 if half else (quant_bytes if quantization == "nf4" else dtype_bytes),
        attn_implementation=backbone.get("attn_implementation") or "sdpa",
        gradient_checkpointing=bool(backbone.get("gradient_checkpointing")),
        lora_r=lora.get("r", 16) if lora else None, lora_targets=(lora or {}).get("target_modules", "all-linear"),
        lora_dropout=float((lora or {}).get("dropout", 0.0)), lora_dora=bool((lora or {}).get("use_dora")),
        optimizer=opt_path, sgd_momentum=momentum,
        loss_chunk_size=int(_value(model, "loss_chunk_size", default=TrainingSetup.loss_chunk_size)),
    )
    _adapter_config(setup, backbone.get("init_adapter"))
    batch = int(_value(data, "micro_batch_size", default=4))
    if model_class.endswith("PPO"):
        prompt = int(_value(data, "max_prompt_length", default=256))
        new = int(_value(model, "sampling", "max_new_tokens", default=16))  # PPO's SamplingSettings default
        setup.micro_batch_size = int(_value(model, "ppo", "forward_batch_size", default=8))  # PPOSettings default
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
    """An existing init adapter brings its own r, targets and DoRA setting (as lit_ft.backbone.build_model does)."""
    path = Path(directory or "") / "adapter_config.json"
    if directory and path.exists():
        saved = json.loads(path.read_text())
        setup.lora_r = saved.get("r", setup.lora_r)
        setup.lora_dora = bool(saved.get("use_dora", setup.lora_dora))
        targets = saved.get("target_modules", setup.lora_targets)
        setup.lora_targets = sorted(targets) if isinstance(targets, (list, set)) else targets


def main(argv: list[str] | None = None) -> None:
    """``lit-ft estimate --config CONFIG [--config CONFIG ...] [overrides]``: print the memory breakdown."""
    parser = ToolParser(
        prog="lit-ft estimate", description="Training memory of a config, from the config alone.",
        epilog="Every other option (--config, --model.init_args...) goes to the lit-ft fit parser.")
    parser.add_argument("--supervised_fraction", type=float, default=None,
                        help="share of positions with a loss (default 1.0: an upper bound; Alpaca is ~0.4)")
    parser.add_argument("--sequence_length", type=int, default=None,
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
          f"optimizer {setup.optimizer_name}\n{est.table()}")
    print(f"(estimated in {time.perf_counter() - start:.1f} s; formula and assumptions: pydoc lit_ft.tools.memory_model)")

