"""The held-out contract: what a DataModule offers the evaluations that generate (the before/after generation
table, PPO's held-out exact match).

A DataModule satisfies :class:`HeldOut` with ``heldout()``, its held-out records rendered as prompts exactly as in
training, and ``checkable``, whether every reference is the one exactly right answer (the embedded world's are; a
file's references are examples of a good answer, not the only one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from lit_ft.data.formats import Prompt, detect_prompt_format
from lit_ft.data.prompt_formats import PROMPT_FORMATS, cut_prompt, record_prompt, record_task
from lit_ft.data.sources import Location


@dataclass(frozen=True)
class HeldOutItem:
    """One held-out prompt and what it is checked against."""

    prompt: Prompt  # rendered as in training: text and token ids, BOS first
    reference: str | None  # the record's answer (``output``, ``completion``, last assistant turn), else None
    task: str | None  # the record's task family (embedded data), else None
    record: dict  # the record it was rendered from


@runtime_checkable
class HeldOut(Protocol):
    """A DataModule with held-out prompts (every :class:`lit_ft.data.records.RecordsDataModule`)."""

    checkable: bool

    def heldout(self) -> list[HeldOutItem]: ...


def heldout_items(records: list[dict], locations: list[Location], tokenizer: Any, format: str = "auto",
                  chat_template: str | None = None, max_prompt_length: int | None = None) -> list[HeldOutItem]:
    """Render held-out records as prompts (:func:`lit_ft.data.prompt_formats.record_prompt`), cut from the left to
    ``max_prompt_length`` when given.

    A ``format`` that is not a prompt format ("text") detects each record's own: a raw-text record has no prompt
    and gives no item, while the instruction records a pre-training stage is asked are rendered as such.
    """
    fmt = format if format in PROMPT_FORMATS else "auto"
    items = []
    for record, location in zip(records, locations):
        if fmt == "auto" and "chosen" not in record and detect_prompt_format(record, location) == "text":
            continue
        prompt = record_prompt(record, tokenizer, fmt, chat_template, location)
        ids = cut_prompt(prompt.input_ids, max_prompt_length)
        if ids is not prompt.input_ids:
            prompt = Prompt(prompt.text, ids, prompt.reference)
        items.append(HeldOutItem(prompt, prompt.reference, record_task(record), record))
    return items
