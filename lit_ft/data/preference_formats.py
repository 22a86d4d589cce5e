"""Preference pairs for reward modelling: record formats, pair tokenization and truncation.

A pair is one prompt and two responses, ``chosen`` (preferred) and ``rejected``. Each response is rendered after
the prompt exactly as SFT renders a prompt and its answer (:func:`lit_ft.data.formats.tokenize_record`), so the
reward model reads the same text the policy produces; every sequence starts with BOS and ends with EOS.

Formats (``format: auto`` picks one from the first record's keys):

* ``alpaca``: ``instruction``, optional ``input``, ``chosen``, ``rejected`` (strings). The prompt is the SFT
  stage's Alpaca prompt; the embedded pairs use it, because PPO feeds the reward model SFT-formatted prompts.
* ``prompt``: ``prompt`` plus ``chosen``/``rejected``. The prompt is a string (one user turn; a string in HH form,
  ``"\\n\\nHuman: ...\\n\\nAssistant:"``, is read as its turns) or a list of chat messages ending with a user turn.
  Each response is a string (one assistant turn) or a list of messages starting with an assistant turn.
* ``chat``: ``chosen``/``rejected`` are whole conversations (message lists) sharing a prefix.
* ``hh``: Anthropic HH-RLHF: ``chosen``/``rejected`` are whole ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
  transcripts. They are split into turns (Human -> user, Assistant -> assistant; consecutive turns of one
  speaker, which a few HH transcripts have, are joined). The prompt is every turn the two share up to the last
  shared ``Assistant:`` marker, and each response is the final assistant turn: the split is on turn boundaries,
  never on characters, so a response that starts like the other one is not cut in the middle of a word.

Chat prompts are rendered with the tokenizer's chat template when it has one, else with the built-in
``<s>[INST] {prompt} [/INST] {response}</s>`` template (``chat_template`` overrides, as for SFT).

An optional ``margin`` column (a number) asks the chosen reward to exceed the rejected one by at least that much.

Truncation keeps what differs. Sequences longer than ``max_seq_length`` lose prompt tokens from the left (BOS
stays), the same number for both sides, since the prompt is shared. A response is never cut: when the longer
response does not fit even after BOS alone, the pair is dropped and counted (cutting one response's end could
remove exactly what makes it worse; cutting both to one length makes the pair compare truncated texts).
Pairs whose two responses are identical after formatting, and pairs with an empty assistant turn, are dropped
and counted too. An empty prompt (instruction, prompt, or user turn) is an error naming the file, line and field,
the same rule as for SFT data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lit_ft.data.formats import (
    EMPTY_PROMPT,
    IGNORE_INDEX,
    resolve_format,
    string_field,
    tokenize_record,
    validate_messages,
)
from lit_ft.data.sources import DataError, Location

PREFERENCE_FORMATS = ("alpaca", "prompt", "chat", "hh")
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class EmptyResponse(Exception):
    """A pair with an empty assistant turn: dropped and counted, not an error."""


# ---------------------------------------------------------------------------------------------- HH transcripts
def hh_turns(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Split an HH transcript at its ``\\n\\nHuman:``/``\\n\\nAssistant:`` markers, without changing any text.

    Returns the text before the first marker and ``(speaker, text)`` turns, where ``text`` is everything after the
    marker (its leading space included): ``lead + "".join(f"\\n\\n{s}:{t}" for s, t in turns) == text``.
    """
    parts = _HH_MARKER.split(text)
    return parts[0], [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]


def parse_hh(text: str, location: Location | None = None, field: str | None = None) -> list[dict[str, str]]:
    """HH transcript -> chat messages (Human -> user, Assistant -> assistant), contents stripped.

    Consecutive turns of one speaker are joined with a blank line, so that roles alternate. An empty Human turn is
    an empty prompt, an error as in every format.
    """
    lead, turns = hh_turns(text)
    if lead.strip() or not turns:
        raise DataError("expected an HH transcript of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns (give a "
                        "'prompt' field for plain responses)", location, field)
    messages: list[dict[str, str]] = []
    for speaker, content in turns:
        role, content = _HH_ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    if any(m["role"] == "user" and not m["content"] for m in messages):
        raise DataError(f"{EMPTY_PROMPT} (a Human turn is empty)", location, field)
    return messages


def split_shared_prompt(chosen: list[dict], rejected: list[dict], location: Location | None = None
                        ) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen continuation, rejected continuation) of two conversations, split on turn boundaries.

    The prompt is the longest run of shared leading turns after which both conversations continue with an
    assistant turn (for HH: every turn up to the last shared ``Assistant:`` marker).
    """
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and not (k < len(chosen) and k < len(rejected)
                         and chosen[k]["role"] == rejected[k]["role"] == "assistant"):
        k -= 1
    if k == 0:
        raise DataError("chosen and rejected share no prompt (they must start with the same user turns and "
                        "differ from an assistant turn on)", location, "chosen")
    return chosen[:k], chosen[k:], rejected[k:]


# ------------------------------------------------------------------------------------------ record validation
def detect_preference_format(record: dict, location: Location | None = None) -> str:
    """alpaca (``instruction``), prompt (``prompt``), chat (message lists) or hh (transcript strings)."""
    if "chosen" not in record or "rejected" not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"cannot detect a preference format from keys ({keys}); expected 'chosen' and 'rejected', "
                        "with 'prompt' or 'instruction', or as whole conversations", location)
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record:
        return "prompt"
    return "chat" if isinstance(record["chosen"], list) else "hh"


def resolve_preference_format(format: str, record: dict, location: Location | None = None) -> str:
    """Validate an explicit preference format name, or detect it from ``record`` when it is ``"auto"``."""
    return resolve_format(format, record, location, known=PREFERENCE_FORMATS, detect=detect_preference_format,
                          kind="preference format")


def _messages(value: Any, location: Location | None, field: str) -> list[dict[str, str]]:
    return validate_messages(value, location, field, reject_empty_assistant=False,
                             expected="a string or a non-empty list of {role, content} objects")


def _margin(record: dict, location: Location | None) -> float:
    value = record.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"expected a number, got {type(value).__name__}", location, "margin")
    return float(value)


def prompt_messages(prompt: Any, location: Location | None = None, field: str = "prompt") -> list[dict[str, str]]:
    """A prompt as chat messages: a plain string is one user turn, an HH-form string its turns, a list as is.

    An empty prompt (or user turn) is a :class:`DataError` naming the field, as in SFT data.
    """
    if isinstance(prompt, str):
        if prompt.lstrip(" ").startswith(("\n\nHuman:", "Human:")):
            messages = parse_hh("\n\n" + prompt.lstrip(" \n"), location, field)
            if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages.pop()  # the trailing "\n\nAssistant:" marker the response follows
            return messages
        if not prompt.strip():
            raise DataError(EMPTY_PROMPT, location, field)
        return [{"role": "user", "content": prompt}]
    messages = _messages(prompt, location, field)
    if messages[-1]["role"] != "user":
        raise DataError("a prompt must end with a user message", location, field)
    return messages


def _response_messages(value: Any, location: Location | None, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value.strip()}]
    messages = _messages(value, location, field)
    if messages[0]["role"] != "assistant":
        raise DataError("a response must start with an assistant message", location, f"{field}[0].role")
    return messages


# ------------------------------------------------------------------------------------------- pair tokenization
@dataclass
class PreferencePair:
    """Token ids of one pair: the shared prompt (BOS first) and each response (EOS last)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0

    @property
    def chosen_length(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids)

    @property
    def rejected_length(self) -> int:
        return len(self.prompt_ids) + len(self.rejected_ids)


def _response_start(labels: list[int], prompt_assistant_turns: int) -> int | None:
    """Where the response begins: the start of supervised run number ``prompt_assistant_turns`` (0-based).

    SFT tokenization supervises every assistant turn; the prompt's own assistant turns come first.
    """
    run = -1
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX):
            run += 1
            if run == prompt_assistant_turns:
                return i
    return None


def encode_prompt_response(prompt: str | list[dict[str, str]], response: str | list[dict[str, str]], tokenizer: Any,
                           chat_template: str | None = None, location: Location | None = None,
                           instruction_input: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one prompt and response, rendered exactly as SFT renders them.

    With ``instruction_input`` not None, ``prompt`` is an Alpaca instruction (and that its input) and the
    response a string; otherwise ``prompt`` and ``response`` are chat messages (strings are one turn each).
    Raises :class:`EmptyResponse` when an assistant turn is empty.
    """
    if instruction_input is not None:
        if not isinstance(response, str) or not response.strip():
            raise EmptyResponse
        record: dict = {"instruction": prompt, "input": instruction_input, "output": response}
        fmt, prompt_turns = "alpaca", 0
    else:
        messages = prompt_messages(prompt, location) if isinstance(prompt, str) else prompt
        continuation = _response_messages(response, location, "response") if isinstance(response, str) else response
        conversation = messages + continuation
        if any(m["role"] == "assistant" and not m["content"].strip() for m in conversation):
            raise EmptyResponse
        record, fmt = {"messages": conversation}, "chat"
        prompt_turns = sum(m["role"] == "assistant" for m in messages)
    encoded = tokenize_record(record, tokenizer, fmt, chat_template, location)
    start = _response_start(encoded["labels"], prompt_turns)
    if start is None:
        raise DataError("the rendered conversation has no response tokens", location)
    return encoded["input_ids"][:start], encoded["input_ids"][start:]


def pair_parts(record: dict, fmt: str, location: Location | None) -> tuple[Any, Any, Any, str | None]:
    """(prompt, chosen, rejected, alpaca input) of a record, validated; chat parts are message lists."""
    if fmt == "alpaca":
        instruction = string_field(record, "instruction", location, non_empty=True, what=EMPTY_PROMPT)
        return (instruction, string_field(record, "chosen", location), string_field(record, "rejected", location),
                string_field(record, "input", location, required=False))
    if fmt == "prompt":
        if "prompt" not in record:
            raise DataError("missing", location, "prompt")
        prompt = prompt_messages(record["prompt"], location)
        chosen = record.get("chosen")
        rejected = record.get("rejected")
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if value is None:
                raise DataError("missing", location, field)
        return (prompt, _response_messages(chosen, location, "chosen"),
                _response_messages(rejected, location, "rejected"), None)
    sides = []
    for field in ("chosen", "rejected"):
        value = record.get(field)
        if value is None:
            raise DataError("missing", location, field)
        if fmt == "hh":
            if not isinstance(value, str):
                raise DataError(f"expected an HH transcript string, got {type(value).__name__}", location, field)
            sides.append(parse_hh(value, location, field))
        else:
            sides.append(_messages(value, location, field))
    prompt, chosen, rejected = split_shared_prompt(sides[0], sides[1], location)
    return prompt, chosen, rejected, None


def tokenize_pair(record: dict, tokenizer: Any, format: str = "auto", chat_template: str | None = None,
                  location: Location | None = None) -> PreferencePair:
    """Render and tokenize one preference record (see the module docstring for the formats).

    Raises :class:`EmptyResponse` for a pair with an empty assistant turn, :class:`DataError` for a bad record.
    """
    fmt = resolve_preference_format(format, record, location)
    prompt, chosen, rejected, alpaca_input = pair_parts(record, fmt, location)
    prompt_c, chosen_ids = encode_prompt_response(prompt, chosen, tokenizer, chat_template, location, alpaca_input)
    prompt_r, rejected_ids = encode_prompt_response(prompt, rejected, tokenizer, chat_template, location,
                                                    alpaca_input)
    if prompt_c != prompt_r:  # cannot happen with prefix-stable templates; guard the shared-prompt assumption
        raise DataError("chosen and rejected render different prompts (the chat template is not prefix-stable)",
                        location)
    return PreferencePair(prompt_c, chosen_ids, rejected_ids, _margin(record, location))


def truncate_pair(pair: PreferencePair, max_seq_length: int) -> PreferencePair | None:
    """Fit both sequences into ``max_seq_length``: cut the shared prompt from the left (BOS stays).

    Returns the pair unchanged when it fits, a pair with a shorter prompt, or None when the longer response alone
    does not fit after BOS (such pairs are dropped: responses are never cut).
    """
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if len(pair.prompt_ids) + longest <= max_seq_length:
        return pair
    budget = max_seq_length - longest  # prompt tokens that fit, BOS included
    if budget < 1:
        return None
    prompt = pair.prompt_ids[:1] + (pair.prompt_ids[len(pair.prompt_ids) - (budget - 1):] if budget > 1 else [])
    return PreferencePair(prompt, pair.chosen_ids, pair.rejected_ids, pair.margin)
