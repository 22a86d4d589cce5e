"""The shared backbone: the tokenizer, the (optionally 4-bit) base model, and named LoRA adapters on it.

Every stage builds its model through :func:`build_model`, so that an adapter trained by one stage loads back onto
the same base in another; :mod:`lit_ft.backbone.adapters` puts several named adapters on one base, and
:mod:`lit_ft.backbone.base_record` saves with each adapter how its base was loaded, for the inference tools.
"""

from lit_ft.backbone.adapters import (
    active_adapter,
    add_adapter,
    keep_trainable_in_checkpoint,
    load_adapter,
    resolve_init_adapter,
    save_adapter,
    trainable_state_dict,
)
from lit_ft.backbone.base_record import BASE_FILE, BaseRecord
from lit_ft.backbone.builder import (
    DTYPES,
    EMBEDDED_TOKENIZER,
    Backbone,
    BackboneModule,
    LoraSettings,
    TinyConfig,
    build_model,
    decoder_and_head,
    load_base_model,
    load_tokenizer,
    looks_local,
    save_full_model,
)
from lit_ft.errors import BackboneError

__all__ = [
    "BASE_FILE",
    "DTYPES",
    "EMBEDDED_TOKENIZER",
    "Backbone",
    "BackboneError",
    "BackboneModule",
    "BaseRecord",
    "LoraSettings",
    "TinyConfig",
    "active_adapter",
    "add_adapter",
    "build_model",
    "decoder_and_head",
    "keep_trainable_in_checkpoint",
    "load_adapter",
    "load_base_model",
    "load_tokenizer",
    "looks_local",
    "resolve_init_adapter",
    "save_adapter",
    "save_full_model",
    "trainable_state_dict",
]
