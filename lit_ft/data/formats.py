"""Turn records into supervised token sequences.

A record is first rendered into :class:`Segment` s of text, each marked supervised or not; every segment is
tokenized on its own and the ids are concatenated, so prompt/response boundaries are exact (a response
token never straddles the prompt). BOS and EOS are added as ids, never as text: every example starts with
BOS (label -100) and each response ends with a supervised EOS so the model learns to stop.

Sentencepiece tokenizers (Mistral, Llama 2) put a word-boundary marker in front of every string they
encode. A segment that continues text is therefore encoded without it (the torchtune "trim leading
whitespace" trick), so the concatenated segment texts are exactly the rendered template and the ids
match tokenizing the whole string at once; a segment that follows BOS/EOS keeps the marker, as a
whole-string encode does after a special token.

Data is text. A record's strings never become control tokens: text such as ``</s>`` inside an instruction or a
message is tokenized as the characters it is, on every path. Only a chat template's own markup (the text it
puts around the messages, e.g. its ``{{ eos_token }}``) may contain control tokens: the rendering is cut into
markup and message contents by rendering the conversation once more with placeholders in place of the contents.

Formats: ``alpaca`` (instruction/input/output), ``chat`` (messages; Alpaca records too, as one user/assistant
exchange), ``prompt_completion`` and ``text`` (raw pre-training text, every token supervised).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

from lit_ft.data.sources import DataError, Location

IGNORE_INDEX = -100  # label value ignored by torch cross-entropy
FORMATS = ("alpaca", "chat", "prompt_completion", "text")
# Passing this as ``chat_template`` forces the built-in Mistral-instruct-like template even when the
# tokenizer carries its own.
BUILTIN_CHAT_TEMPLATE = "builtin"
# One rule for every format, SFT, preference and prompt data alike: an empty prompt (an instruction, a prompt, a
# user turn) is an error naming the file, line and field. Unlike an empty response, which real data has a few of
# and which is skipped and counted, an empty prompt leaves nothing to condition on.
EMPTY_PROMPT = "empty prompt"

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class Segment(NamedTuple):
    """A piece of rendered text; ``eos`` appends the EOS id (with the same supervision) after it.

    ``markup``: a control token a chat template wrote around the messages (one special-token string, tokenized
    to its id). Everything else, data included, is always tokenized as text.
    """

    text: str
    supervised: bool
    eos: bool = False
    markup: bool = False


@dataclass
class Prompt:
    """What a generator is given for a record: the prompt text, its ids (with BOS) and the reference."""

    text: str
    input_ids: list[int]
    reference: str | None


def format_alpaca_prompt(instruction: str, input: str = "") -> str:
    """Render the Stanford Alpaca prompt; a blank ``input`` selects the no-input template."""
    if input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def detect_format(record: dict, location: Location | None = None) -> str:
    """Pick a format from the record's keys: messages > instruction+output > prompt+completion > text."""
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(
        f"cannot detect the format from keys ({keys}); expected 'messages', 'instruction'+'output', "
        "'prompt'+'completion' or 'text'",
        location,
    )


def detect_prompt_format(record: dict, location: Location | None = None) -> str:
    """The format of a record a prompt is taken from: as :func:`detect_format`, but the answer may be absent
    (``instruction`` alone is Alpaca, ``prompt`` alone is prompt/completion)."""
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(f"cannot detect a prompt format from keys ({keys}); expected 'messages', 'instruction' or "
                    "'prompt' (the answer, 'output' or 'completion', may be left out)", location)


def check_format_name(format: str, known: tuple[str, ...] = FORMATS, kind: str = "format") -> str:
    """``format`` when it is "auto" or one of ``known``; otherwise a DataError naming the ``kind`` and the choices
    (a data module checks its setting with it when built, :func:`resolve_format` each record's)."""
    if format != "auto" and format not in known:
        raise DataError(f"unknown {kind} '{format}' (expected auto, {', '.join(known)})")
    return format


def resolve_format(format: str, record: dict, location: Location | None = None, *,
                   known: tuple[str, ...] = FORMATS, detect=detect_format, kind: str = "format") -> str:
    """Validate an explicit format name (one of ``known``), or ``detect`` it from ``record`` when it is "auto"."""
    check_format_name(format, known, kind)
    return detect(record, location) if format == "auto" else format


def string_field(record: dict, field: str, location: Location | None, *, required: bool = True,
                 non_empty: bool = False, what: str = "empty") -> str:
    """Fetch a string field, raising a DataError naming the field when it is missing or malformed."""
    value = record.get(field)
    if value is None:
        if required:
            raise DataError("missing", location, field)
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", location, field)
    if non_empty and not value.strip():
        raise DataError(what, location, field)
    return value


def validate_messages(value: Any, location: Location | None, field: str = "messages", *,
                      reject_empty_assistant: bool = True,
                      expected: str = "a non-empty list of {role, content} objects") -> list[dict[str, str]]:
    """A list of {role, content} with known roles and string contents; errors name ``field[i]``.

    An empty user turn is an error (:data:`EMPTY_PROMPT`). An empty assistant turn is an error unless
    ``reject_empty_assistant`` is False (preference pairs count and drop those instead).
    """
    if not isinstance(value, list) or not value:
        raise DataError(f"expected {expected}", location, field)
    clean = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"expected an object, got {type(message).__name__}", location, f"{field}[{i}]")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"unknown role {role!r} (expected system, user or assistant)", location,
                            f"{field}[{i}].role")
        content = message.get("content")
        if not isinstance(content, str):
            problem = "missing" if content is None else f"expected a string, got {type(content).__name__}"
            raise DataError(problem, location, f"{field}[{i}].content")
        if role == "user" and not content.strip():
            raise DataError(EMPTY_PROMPT, location, f"{field}[{i}].content")
        if reject_empty_assistant and role == "assistant" and not content.strip():
            raise DataError("empty response", location, f"{field}[{i}].content")
        clean.append({"role": role, "content": content})
    return clean


def alpaca_messages(record: dict, location: Location | None) -> list[dict[str, str]]:
    """An Alpaca record as one chat exchange: the instruction (then the input after a blank line) is the user's
    turn, the output (when there is one) the assistant's. ``format: chat`` renders Alpaca data this way, so that
    the 7B recipes' SFT on Alpaca uses the ``[INST]`` template of their HH reward-model and PPO stages."""
    instruction = string_field(record, "instruction", location, non_empty=True)
    extra = string_field(record, "input", location, required=False)
    messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}]
    if record.get("output") is not None:
        output = string_field(record, "output", location, non_empty=True, what="empty response")
        messages.append({"role": "assistant", "content": output})
    return messages


def _chat_messages(record: dict, location: Location | None) -> list[dict[str, str]]:
    """Validate the ``messages`` field of a chat record; an Alpaca record (no ``messages``) becomes one exchange."""
    messages = record.get("messages")
    if messages is None:
        if "instruction" in record:
            return alpaca_messages(record, location)
        raise DataError("missing", location, "messages")
    return validate_messages(messages, location)


def _last_assistant(messages: list[dict[str, str]], location: Location | None) -> int:
    """Index of the last assistant message; a conversation without one has nothing to learn."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return i
    raise DataError("no assistant message to train on", location, "messages")


def _builtin_chat_segments(messages: list[dict[str, str]], location: Location | None) -> list[Segment]:
    """``[INST] {user} [/INST] {assistant}</s>[INST] ...``; a system message prefixes the first user turn."""
    system = ""
    first = 0  # index of the first non-system message, so errors name the record's own indices
    if messages and messages[0]["role"] == "system":
        system, first = messages[0]["content"], 1
    segments: list[Segment] = []
    expected = "user"
    for i, message in enumerate(messages[first:], start=first):
        role = message["role"]
        if role != expected:
            raise DataError(f"expected a '{expected}' message here (roles must alternate user/assistant, "
                            "after an optional first system message)", location, f"messages[{i}].role")
        if role == "user":
            user = f"{system}\n\n{message['content']}" if system and not segments else message["content"]
            segments.append(Segment(f"[INST] {user} [/INST]", supervised=False))
            expected = "assistant"
        else:
            segments.append(Segment(" " + message["content"], supervised=True, eos=True))
            expected = "user"
    return segments


def _render_template(tokenizer: Any, messages: list[dict], template: str | None, generation: bool,
                     location: Location | None) -> str:
    """Render ``messages`` through a Jinja chat template, wrapping template errors as DataError."""
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as e:  # jinja raises TemplateError subclasses, templates raise their own errors
        raise DataError(f"chat template failed ({type(e).__name__}: {e})", location, "messages") from e
    return text if isinstance(text, str) else str(text)


_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no tokenizer's markup, and left alone by `trim`
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


def _content_spans(tokenizer: Any, messages: list[dict[str, str]], template: str, generation: bool,
                   location: Location | None, text: str) -> list[tuple[int, int]]:
    """Where the message contents lie in ``text``, the template's rendering of ``messages``.

    The conversation is rendered again with a placeholder for each content: what the template writes around the
    placeholders is its markup. Each content is then found between the markup pieces, as written or with the
    surrounding whitespace a template's ``trim`` removes.
    """
    marked = [dict(message, content=_PLACEHOLDER.format(i)) for i, message in enumerate(messages)]
    parts = _PLACEHOLDER_RE.split(_render_template(tokenizer, marked, template, generation, location))
    markup, order = parts[0::2], [int(i) for i in parts[1::2]]
    if not text.startswith(markup[0]):
        raise DataError("chat template renders differently depending on the message contents; lit_ft cannot "
                        "tell its markup from the data", location, "messages")
    spans, pos = [], len(markup[0])
    for k, index in enumerate(order):
        content, following, last = messages[index]["content"], markup[k + 1], k == len(order) - 1
        for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            end = pos + len(candidate)
            if text.startswith(candidate, pos) and (text[end:] == following if last
                                                    else text.startswith(following, end)):
                break
        else:
            raise DataError(f"chat template changes the content of message {index} beyond trimming whitespace; "
                            "lit_ft cannot keep the data apart from the template's markup", location,
                            f"messages[{index}].content")
        if candidate:
            spans.append((pos, end))
        pos = end + len(following)
    return spans


def _special_tokens_pattern(tokenizer: Any) -> re.Pattern | None:
    specials = sorted(set(getattr(tokenizer, "all_special_tokens", ()) or ()), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _control_and_text(text: str, start: int, spans: list[tuple[int, int]], supervised: bool,
                      specials: re.Pattern | None) -> list[Segment]:
    """``text[start:]`` as segments: the special tokens the template's markup writes (``markup`` segments, one
    control token each), and the text between them, message contents included (always text).

    Text is cut only where a control token stands, as a whole-string encode cuts it, so ids match tokenizing
    the rendering at once whenever the data holds no special-token text.
    """
    pieces, run, pos = [], start, start
    markup_regions = []
    for a, b in [*spans, (len(text), len(text))]:
        if b <= pos:
            continue
        if a > pos:
            markup_regions.append((pos, a))
        pos = max(pos, b)
    for a, b in markup_regions:
        for match in specials.finditer(text, a, b) if specials else ():
            if match.start() > run:
                pieces.append(Segment(text[run:match.start()], supervised))
            pieces.append(Segment(match.group(), supervised, markup=True))
            run = match.end()
    if run < len(text):
        pieces.append(Segment(text[run:], supervised))
    return pieces


def _template_chat_segments(messages: list[dict[str, str]], tokenizer: Any, template: str,
                            location: Location | None, generation_prompt: bool = False) -> list[Segment]:
    """Cut a chat-template rendering into segments by rendering growing prefixes of the conversation.

    For each assistant turn, the text between "history + generation prompt" and "history + that turn"
    is the supervised answer (including whatever end-of-turn marker the template emits). Templates whose
    renderings of shorter conversations are not prefixes of longer ones cannot be split this way.
    With ``generation_prompt`` the segments end with the prompt for a new assistant turn. Each piece is further
    cut at the control tokens of the template's markup; message contents (:func:`_content_spans`) stay text.
    """
    segments: list[Segment] = []
    done = ""
    specials = _special_tokens_pattern(tokenizer)

    def cut(prefix_len: int, generation: bool, index: int, supervised: bool) -> None:
        nonlocal done
        text = _render_template(tokenizer, messages[:prefix_len], template, generation, location)
        if not text.startswith(done):
            raise DataError(f"chat template is not prefix-stable at message {index} (rendering a longer "
                            "conversation changes earlier text); use a different chat_template", location,
                            "messages")
        spans = _content_spans(tokenizer, messages[:prefix_len], template, generation, location, text)
        segments.extend(_control_and_text(text, len(done), spans, supervised, specials))
        done = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            cut(i, True, i, supervised=False)
            cut(i + 1, False, i, supervised=True)
    if generation_prompt:
        cut(len(messages), True, len(messages), supervised=False)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and segments and segments[0].markup and segments[0].text == bos:
        segments.pop(0)  # we add BOS as an id ourselves; keep the template's copy out
    return segments


def _chat_template_for(tokenizer: Any, chat_template: str | None) -> str | None:
    """The Jinja template to use, or None for the built-in Mistral-instruct-like rendering."""
    if chat_template == BUILTIN_CHAT_TEMPLATE:
        return None
    return chat_template or getattr(tokenizer, "chat_template", None) or None


def record_segments(record: dict, tokenizer: Any, format: str = "auto",
                    chat_template: str | None = None, location: Location | None = None) -> list[Segment]:
    """Render ``record`` into text segments (before BOS/EOS and tokenization)."""
    fmt = resolve_format(format, record, location)
    if fmt == "alpaca":
        instruction = string_field(record, "instruction", location, non_empty=True, what=EMPTY_PROMPT)
        input_text = string_field(record, "input", location, required=False)
        output = string_field(record, "output", location, non_empty=True, what="empty response")
        return [Segment(format_alpaca_prompt(instruction, input_text), False), Segment(output, True, eos=True)]
    if fmt == "prompt_completion":
        prompt = string_field(record, "prompt", location, non_empty=True, what=EMPTY_PROMPT)
        completion = string_field(record, "completion", location, non_empty=True, what="empty response")
        return [Segment(prompt, False), Segment(completion, True, eos=True)]
    if fmt == "text":
        return [Segment(string_field(record, "text", location, non_empty=True), True, eos=True)]
    messages = _chat_messages(record, location)
    messages = messages[: _last_assistant(messages, location) + 1]  # trailing user turns carry no loss
    template = _chat_template_for(tokenizer, chat_template)
    if template is None:
        return _builtin_chat_segments(messages, location)
    return _template_chat_segments(messages, tokenizer, template, location)


_NEWLINE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> ids of "\n"


def _encode(tokenizer: Any, text: str, markup: bool, continuation: bool) -> list[int]:
    """Encode text without automatic special tokens.

    ``continuation``: the text directly follows other text, so drop the word-boundary marker a
    sentencepiece tokenizer would prepend (encode ``"\n" + text`` and cut the newline's ids off).
    ``markup``: a chat template's own text, where strings like ``</s>`` are control tokens; any other text, the
    data above all, is split as text (``split_special_tokens``).
    """
    if not text:
        return []
    split = not markup
    if not continuation:
        return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split))
    newline = _NEWLINE_IDS.get(tokenizer)
    if newline is None:
        newline = list(tokenizer.encode("\n", add_special_tokens=False))
        _NEWLINE_IDS[tokenizer] = newline
    ids = list(tokenizer.encode("\n" + text, add_special_tokens=False, split_special_tokens=split))
    if ids[: len(newline)] == newline:
        return ids[len(newline):]
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split))  # newline merged


def _encode_segments(segments: list[Segment], tokenizer: Any) -> list[list[int]]:
    """Ids of each segment (EOS included where asked), encoded as a continuation of what precedes it."""
    specials = tuple(getattr(tokenizer, "all_special_tokens", ()))
    after_special = True  # every sequence starts with BOS
    encoded = []
    for segment in segments:
        ids = _encode(tokenizer, segment.text, segment.markup, continuation=not after_special)
        if segment.eos:
            ids.append(tokenizer.eos_token_id)
        if segment.eos or segment.text:
            after_special = segment.eos or (segment.markup and bool(specials) and segment.text.endswith(specials))
        encoded.append(ids)
    return encoded


def tokenize_segments(segments: list[Segment], tokenizer: Any) -> dict:
    """BOS + each segment's ids (+ EOS where asked), with labels = ids on supervised segments else -100.

    The sequence always ends with a supervised EOS, so the model learns to stop after the last answer.
    """
    eos = tokenizer.eos_token_id
    input_ids: list[int] = [tokenizer.bos_token_id]
    labels: list[int] = [IGNORE_INDEX]
    for segment, ids in zip(segments, _encode_segments(segments, tokenizer)):
        input_ids.extend(ids)
        labels.extend(ids if segment.supervised else [IGNORE_INDEX] * len(ids))
    if input_ids[-1] != eos:  # e.g. a chat template whose turns end with a marker other than EOS
        input_ids.append(eos)
        labels.append(eos)
    return {"input_ids": input_ids, "labels": labels}


def tokenize_record(record: dict, tokenizer: Any, format: str = "auto",
                    chat_template: str | None = None, location: Location | None = None) -> dict:
    """Tokenize one record into ``{"input_ids": [...], "labels": [...]}`` (same length, plain lists)."""
    fmt = resolve_format(format, record, location)
    return tokenize_segments(record_segments(record, tokenizer, fmt, chat_template, location), tokenizer)


def format_prompt(record: dict, tokenizer: Any, format: str = "auto",
                  chat_template: str | None = None, location: Location | None = None) -> Prompt:
    """The prompt a generator should continue for ``record``, tokenized exactly as in training.

    For chat, the prompt is the conversation before the last assistant message and the reference is
    that message (None when the conversation ends with a user turn). The answer may be absent in every format
    (``format="auto"`` reads ``{"instruction": ...}`` as Alpaca, ``{"prompt": ...}`` as prompt/completion).
    Raw text has no prompt.
    """
    fmt = resolve_format(format, record, location, detect=detect_prompt_format)
    template = _chat_template_for(tokenizer, chat_template) if fmt == "chat" else None
    reference: str | None
    if fmt == "text":
        raise DataError("format 'text' has no prompt to generate from", location)
    if fmt == "alpaca":
        instruction = string_field(record, "instruction", location, non_empty=True, what=EMPTY_PROMPT)
        input_text = string_field(record, "input", location, required=False)
        segments = [Segment(format_alpaca_prompt(instruction, input_text), False)]
        reference = string_field(record, "output", location, required=False) or None
    elif fmt == "prompt_completion":
        segments = [Segment(string_field(record, "prompt", location, non_empty=True, what=EMPTY_PROMPT), False)]
        reference = string_field(record, "completion", location, required=False) or None
    else:
        messages = _chat_messages(record, location)
        reference = None
        if messages[-1]["role"] == "assistant":
            reference = messages[-1]["content"]
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataError("a prompt must end with a user message", location, "messages")
        if template is None:
            segments = _builtin_chat_segments(messages, location)
        else:
            segments = _template_chat_segments(messages, tokenizer, template, location, generation_prompt=True)
    input_ids = [tokenizer.bos_token_id]
    for ids in _encode_segments(segments, tokenizer):
        input_ids.extend(ids)
    eos_text = getattr(tokenizer, "eos_token", None) or ""
    text = "".join(segment.text + (eos_text if segment.eos else "") for segment in segments)
    return Prompt(text=text, input_ids=input_ids, reference=reference)
