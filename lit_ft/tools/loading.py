"""How ``lit-ft generate``, ``score`` and ``export`` load a base model: as its adapter was trained.

An adapter's ``lit_ft_base.json`` (:mod:`lit_ft.backbone.base_record`) says how its base was loaded in training;
the tools load it the same way, so a QLoRA adapter of Mistral-7B runs on its 4-bit NF4 base with bfloat16 compute
(about 4 GB) rather than on a float32 copy (29 GB). Two flags, the same in every tool, override the record:

    --dtype {float32,bfloat16,float16}   what the model computes in: the unquantised weights and the 4-bit matmuls
    --load-in-4bit / --no-load-in-4bit   load the base in 4-bit NF4, or unquantised

Without a record (an adapter made elsewhere, a merged export, a bare base) the base loads unquantised, in float32
on CPU and bfloat16 on a GPU; ``--load-in-4bit`` then means NF4 with bfloat16 compute (QLoRA's settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from lit_ft.backbone import DTYPES, Backbone, BackboneError, load_adapter, load_base_model, load_tokenizer
from lit_ft.backbone.base_record import BaseRecord


def add_loading_flags(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--load-in-4bit/--no-load-in-4bit``, with the record's values as their defaults."""
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="dtype the model computes in: its unquantised weights and 4-bit matmuls (default: as "
                             "trained, from the adapter's lit_ft_base.json; else float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--load-in-4bit", dest="load_in_4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="load the base in 4-bit NF4, or not (default: as trained)")


def default_dtype() -> str:
    """Without a record: float32 on CPU (exact, and no fast bfloat16 matmul there), bfloat16 on a GPU."""
    return "bfloat16" if torch.cuda.is_available() else "float32"


def base_spec(pretrained: str, record: BaseRecord | None = None, dtype: str | None = None,
              load_in_4bit: bool | None = None) -> Backbone:
    """The backbone that loads ``pretrained`` as ``record`` says it was trained, with the flags' overrides."""
    if record is not None:
        spec = record.backbone()
    else:
        plain = default_dtype()
        spec = Backbone(dtype=plain, compute_dtype="bfloat16", lora=None)
    spec = dataclasses.replace(spec, pretrained=pretrained, lora=None, init_adapter=None, gradient_checkpointing=False)
    if load_in_4bit is not None:
        spec = dataclasses.replace(spec, quantization="nf4" if load_in_4bit else "none")
    if dtype is not None:
        spec = dataclasses.replace(spec, dtype=dtype, compute_dtype=dtype)
    elif spec.quantization == "nf4" and record is not None and record.quantization == "none":
        spec = dataclasses.replace(spec, compute_dtype=spec.dtype)  # --load-in-4bit on an unquantised record
    return spec


def describe(spec: Backbone) -> str:
    """How the base is loaded, for the tools' first line: "NF4 with bfloat16 compute" or "float32"."""
    if spec.quantization == "nf4":
        return f"NF4 with {spec.compute_dtype} compute"
    return spec.dtype


def adapter_base(adapter: str | Path, record: BaseRecord | None = None) -> str | None:
    """The base model an adapter was trained on: its record's, else ``base_model_name_or_path`` of its config."""
    config = Path(adapter) / "adapter_config.json"
    if not config.exists():
        raise BackboneError(f"{adapter}: adapter directory not found (no adapter_config.json)")
    if record is not None and record.pretrained:
        return record.pretrained
    return json.loads(config.read_text()).get("base_model_name_or_path") or None


def tokenizer_source(spec: Backbone, adapter: str | Path | None) -> str | None:
    """The adapter folder's own tokenizer when it has one, else the record's tokenizer setting, else the base's."""
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").exists():
        return str(adapter)
    return spec.tokenizer or spec.pretrained


def load_base(spec: Backbone, tokenizer: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer): the base loaded by ``spec`` (4-bit on the GPU when it has one), in eval mode with its
    KV cache on, and not prepared for training (its unquantised weights stay in ``spec.dtype``). ``tokenizer`` is a loaded tokenizer or where to load one from (default: the base's)."""
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer or spec.pretrained)
    on_gpu = torch.cuda.is_available()
    device_map = {"": "cuda:0"} if on_gpu and spec.quantization != "none" else None
    model = load_base_model(spec, tokenizer, device_map, low_host_memory=not on_gpu)  # host RAM on CPU only
    if on_gpu and spec.quantization == "none":
        model = model.to("cuda")
    model.eval()
    model.config.use_cache = True
    return model, tokenizer


def load_with_adapter(spec: Backbone, adapter: str | Path | None, adapter_name: str = "tuned") -> tuple[Any, Any]:
    """(model, tokenizer): the base, with ``adapter`` on it under ``adapter_name`` when given."""
    model, tokenizer = load_base(spec, tokenizer_source(spec, adapter))
    if adapter is not None:
        model = load_adapter(model, str(adapter), adapter_name)
        model.eval()
    return model, tokenizer
