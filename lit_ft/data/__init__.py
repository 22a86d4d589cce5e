"""Data layer: load records, render and tokenize formats, pack or pad, and the LightningDataModules.

The records base (:mod:`lit_ft.data.records`), the DataModules of each data shape (``instruction``, ``preference``,
``prompts``), the held-out contract (``heldout``) and the embedded world (``embedded``) are imported lazily:
importing Lightning takes seconds, and code that only tokenizes or packs (tests, generation callbacks) should not
pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lit_ft.data.formats import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    BUILTIN_CHAT_TEMPLATE,
    FORMATS,
    IGNORE_INDEX,
    Prompt,
    Segment,
    detect_format,
    detect_prompt_format,
    format_alpaca_prompt,
    format_prompt,
    record_segments,
    resolve_format,
    tokenize_record,
    tokenize_segments,
)
from lit_ft.data.packing import (
    DataStats,
    ExampleStore,
    OverlongResult,
    PackedCollator,
    PackedDataset,
    PaddedCollator,
    PaddedDataset,
    handle_overlong,
    pack,
    packed_stats,
    padded_stats,
)
from lit_ft.data.sources import (
    DataError,
    Location,
    format_error,
    load_records,
    load_records_with_locations,
    looks_like_path,
)

if TYPE_CHECKING:
    from lit_ft.data.embedded import EmbeddedWorld
    from lit_ft.data.heldout import HeldOut, HeldOutItem
    from lit_ft.data.instruction import InstructionDataModule, PretrainDataModule
    from lit_ft.data.preference import PreferenceDataModule
    from lit_ft.data.prompts import PromptDataModule
    from lit_ft.data.records import RecordsDataModule, RecordSource, RecordSplits, SeededShuffleSampler

_LAZY = {
    "EmbeddedWorld": "lit_ft.data.embedded",
    "HeldOut": "lit_ft.data.heldout",
    "HeldOutItem": "lit_ft.data.heldout",
    "InstructionDataModule": "lit_ft.data.instruction",
    "PretrainDataModule": "lit_ft.data.instruction",
    "PreferenceDataModule": "lit_ft.data.preference",
    "PromptDataModule": "lit_ft.data.prompts",
    "RecordSource": "lit_ft.data.records",
    "RecordSplits": "lit_ft.data.records",
    "RecordsDataModule": "lit_ft.data.records",
    "SeededShuffleSampler": "lit_ft.data.records",
}


def __getattr__(name: str) -> Any:
    """Resolve the DataModule names on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "BUILTIN_CHAT_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "DataError",
    "DataStats",
    "EmbeddedWorld",
    "ExampleStore",
    "HeldOut",
    "HeldOutItem",
    "InstructionDataModule",
    "Location",
    "OverlongResult",
    "PackedCollator",
    "PackedDataset",
    "PaddedCollator",
    "PaddedDataset",
    "PreferenceDataModule",
    "PretrainDataModule",
    "Prompt",
    "PromptDataModule",
    "RecordSource",
    "RecordSplits",
    "RecordsDataModule",
    "SeededShuffleSampler",
    "Segment",
    "detect_format",
    "detect_prompt_format",
    "format_alpaca_prompt",
    "format_error",
    "format_prompt",
    "handle_overlong",
    "load_records",
    "load_records_with_locations",
    "looks_like_path",
    "pack",
    "packed_stats",
    "padded_stats",
    "record_segments",
    "resolve_format",
    "tokenize_record",
    "tokenize_segments",
]
