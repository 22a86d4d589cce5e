"""Named LoRA adapters on one base model: add, load, save, switch between them, and keep only their weights.

One base can hold several adapters (the policy, value, reward and reference roles of PPO). Adapters are saved
in PEFT format, so that ``PeftModel.from_pretrained(base, directory)`` loads them anywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lit_ft.errors import BackboneError

if TYPE_CHECKING:
    from lit_ft.backbone.base_record import BaseRecord
    from lit_ft.backbone.builder import Backbone, LoraSettings


def resolve_init_adapter(spec: Backbone) -> str | None:
    """The adapter directory to start from, or None; a missing required one is a one-line error."""
    if spec.init_adapter is None:
        return None
    if (Path(spec.init_adapter) / "adapter_config.json").exists():
        return spec.init_adapter
    if spec.init_adapter_required:
        raise BackboneError(f"{spec.init_adapter}: adapter directory not found (no adapter_config.json)")
    return None


def load_adapter(model, directory: str, adapter_name: str, trainable: bool = False):
    """Load a saved PEFT adapter onto ``model`` (plain or already a ``PeftModel``) under ``adapter_name``.

    An adapter that does not fit the base (other shapes, or tensors for modules the base lacks: it was trained
    on another model) is a one-line :class:`BackboneError`, never a partial load.
    """
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(directory, adapter_name=adapter_name, is_trainable=trainable)
        else:
            model = PeftModel.from_pretrained(model, directory, adapter_name=adapter_name, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        detail = next((line for line in lines if "size mismatch" in line), lines[0])
        raise BackboneError(f"{directory}: the adapter does not fit the base model ({detail}); was it trained on "
                            "another base?") from None
    _check_all_loaded(model, directory, adapter_name)
    model.set_adapter(adapter_name)
    return model


def validate_lora(lora: LoraSettings) -> None:
    """One line per impossible LoRA setting, each naming its own field (PEFT's messages would blame the targets)."""
    if isinstance(lora.r, bool) or not isinstance(lora.r, int) or lora.r < 1:
        raise BackboneError(f"lora.r must be a positive integer (the adapter's rank), got {lora.r!r}")
    if isinstance(lora.alpha, bool) or not isinstance(lora.alpha, (int, float)) or not lora.alpha > 0:
        raise BackboneError(f"lora.alpha must be > 0 (updates are scaled by alpha / r), got {lora.alpha!r}")
    if isinstance(lora.dropout, bool) or not isinstance(lora.dropout, (int, float)) or not 0 <= lora.dropout < 1:
        raise BackboneError(f"lora.dropout must be in [0, 1), got {lora.dropout!r}")
    targets = lora.target_modules
    if not targets or (not isinstance(targets, str) and not all(isinstance(t, str) and t for t in targets)):
        raise BackboneError(f"lora.target_modules must name modules (or be 'all-linear'), got {targets!r}")
    name = lora.adapter_name
    if not isinstance(name, str) or not name.strip() or "." in name or name != name.strip():
        raise BackboneError(f"lora.adapter_name must be a non-empty name without dots or spaces around it, "
                            f"got {name!r}")


def _check_all_loaded(model, directory: str | os.PathLike, adapter_name: str) -> None:
    """Every tensor of the saved adapter found a module of the same shape in ``model`` (PEFT only warns)."""
    from safetensors import safe_open

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as f:
        saved = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    name = re.compile(rf"\.{re.escape(adapter_name)}(?=\.|$)")
    loaded = {name.sub("", key): tuple(p.shape) for key, p in model.named_parameters() if name.search(key)}
    missing = [key for key, shape in saved.items() if loaded.get(key) != shape]
    if missing:
        raise BackboneError(f"{directory}: {len(missing)} of {len(saved)} adapter tensors match no module of the "
                            f"base model (e.g. {missing[0]}); the adapter was trained on another base")


def add_adapter(model, lora: LoraSettings, trainable: bool = True):
    """Add a named LoRA adapter, to a plain model (making it a ``PeftModel``) or to an existing ``PeftModel``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    validate_lora(lora)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        if isinstance(model, PeftModel):
            model.add_adapter(lora.adapter_name, config)
        else:
            model = get_peft_model(model, config, adapter_name=lora.adapter_name)
    except ValueError as err:
        message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "target" in message.lower() or "module" in message.lower():
            raise BackboneError(f"lora.target_modules={lora.target_modules!r}: {message}") from None
        raise BackboneError(f"lora: {message}") from None
    model.set_adapter(lora.adapter_name)
    if not trainable:
        for name, p in model.named_parameters():
            if f".{lora.adapter_name}." in name:
                p.requires_grad_(False)
    return model


def save_adapter(model, directory: str | os.PathLike, adapter_name: str, tokenizer=None,
                 base: BaseRecord | None = None) -> Path:
    """Write one adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``) into ``directory``,
    with the tokenizer and ``lit_ft_base.json`` (how its base was loaded, :mod:`lit_ft.backbone.base_record`).

    Loads back with ``PeftModel.from_pretrained(base, directory)``. Written to a temporary folder then renamed,
    so an interrupted save never leaves a half-written adapter.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(directory)
    with staged_dir(out) as tmp:
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / "adapter_model.safetensors")
        model.peft_config[adapter_name].save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if base is not None:
            base.write(tmp)
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``out`` to write into; it replaces ``out`` when the block ends, and is
    removed when the block fails (a full disk, a permission): ``out`` is then left as it was."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def trainable_state_dict(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Only the parameters that require grad: what a checkpoint must hold (never the frozen base)."""
    return {prefix + n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def keep_trainable_in_checkpoint(module: torch.nn.Module, checkpoint: dict, extra: tuple[str, ...] = ()) -> None:
    """Drop every frozen tensor from ``checkpoint["state_dict"]``, keeping trainable parameters and ``extra`` keys.

    A 7B QLoRA checkpoint stays adapter-sized; the frozen base is rebuilt from its source on resume.
    """
    keep = {n for n, p in module.named_parameters() if p.requires_grad} | set(extra)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}




@contextlib.contextmanager
def active_adapter(model: nn.Module, adapter_name: str | None) -> Iterator[None]:
    """Run with ``adapter_name`` active (None: every adapter disabled, the bare base), then restore the previous
    adapter and every ``requires_grad`` flag.

    PEFT's ``set_adapter``, and leaving ``disable_adapter``, also change which adapters train; a reward or
    reference call in the middle of PPO must not.
    """
    previous = getattr(model, "active_adapter", None)
    if adapter_name is not None and previous == adapter_name:
        yield
        return
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if adapter_name is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter_name)
            yield
    finally:
        if adapter_name is not None and previous is not None:
            model.set_adapter(previous)
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))


def replace_dir(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
