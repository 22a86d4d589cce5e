"""How a record becomes a generation prompt: for PPO's rollouts and for every held-out evaluation.

The prompt is rendered exactly as training rendered it, so that the policy continues the text it learned:

* an instruction record (Alpaca ``instruction``, ``prompt``/``completion``, chat ``messages``) gives the prompt SFT
  trained on (:func:`lit_ft.data.formats.format_prompt`); its answer (``output``, ``completion``, a chat's last
  assistant turn) becomes the prompt's ``reference``, which programmatic rewards and exact match read;
* a prompt-only record needs no answer: ``{"instruction": ...}`` is an Alpaca prompt, ``{"prompt": "..."}`` is
  used as plain text (as in prompt/completion SFT), and ``{"prompt": [messages]}`` is a chat ending with a user
  turn. With ``format: prompt`` (or ``hh``) a string prompt is one user turn of the chat template instead, as the
  reward model's preference records render it;
* a preference record (``chosen``/``rejected``) gives the shared prompt of its pair
  (:func:`lit_ft.data.preference_formats.pair_parts`), with no reference: the chosen answer is only preferred.

An empty prompt is an error in every format (the same rule as SFT and preference data).
"""

from __future__ import annotations

from typing import Any

from lit_ft.data.formats import FORMATS, Prompt, format_prompt
from lit_ft.data.preference_formats import (
    PREFERENCE_FORMATS,
    pair_parts,
    prompt_messages,
    resolve_preference_format,
)
from lit_ft.data.sources import Location

PROMPT_FORMATS = tuple(dict.fromkeys(f for f in FORMATS + PREFERENCE_FORMATS if f != "text"))
CHAT_PROMPT_FORMATS = ("prompt", "hh")  # preference formats whose string prompts are user turns


def _chat_prompt(messages: list[dict[str, str]], tokenizer: Any, chat_template: str | None,
                 location: Location | None) -> Prompt:
    rendered = format_prompt({"messages": messages}, tokenizer, "chat", chat_template, location)
    return Prompt(rendered.text, rendered.input_ids, None)


def record_prompt(record: dict, tokenizer: Any, format: str = "auto", chat_template: str | None = None,
                  location: Location | None = None) -> Prompt:
    """The prompt of an instruction, prompt-only or preference record (see the module docstring)."""
    if "chosen" in record and "rejected" in record:
        fmt = resolve_preference_format(format if format in PREFERENCE_FORMATS else "auto", record, location)
        prompt, _, _, alpaca_input = pair_parts(record, fmt, location)
        if alpaca_input is not None:
            return format_prompt({"instruction": prompt, "input": alpaca_input}, tokenizer, "alpaca", None, location)
        return _chat_prompt(prompt, tokenizer, chat_template, location)  # the chosen answer is not a reference
    prompt_only = "prompt" in record and "completion" not in record and "messages" not in record
    if prompt_only and (format in CHAT_PROMPT_FORMATS or isinstance(record["prompt"], list)):
        return _chat_prompt(prompt_messages(record["prompt"], location), tokenizer, chat_template, location)
    return format_prompt(record, tokenizer, format if format in FORMATS else "auto", chat_template, location)


def cut_prompt(ids: list[int], max_length: int | None) -> list[int]:
    """Keep the end of an overlong prompt (the question), and its first token (BOS)."""
    if max_length is None or len(ids) <= max_length:
        return ids
    return ids[:1] + ids[len(ids) - (max_length - 1):]


def record_task(record: Any) -> str | None:
    """The task family a record names (the embedded world's records do), for per-task metrics."""
    task = record.get("task") if isinstance(record, dict) else None
    return str(task) if task is not None else None
