"""``lit-ft chat``: a multi-turn conversation in the terminal with a trained adapter or a merged model.

    lit-ft chat --adapter artifacts/sft/adapter          # the base loads as the adapter was trained (4-bit or not)
    lit-ft chat --model artifacts/sft/merged             # a merged export (its lit_ft.json names the template)
    lit-ft chat --adapter artifacts/sft/adapter --sample --temperature 0.7 --max_context 1024

Each turn is rendered with the template the model was trained on (the adapter's ``lit_ft_base.json``, or a merged
export's ``lit_ft.json``; ``--format`` overrides it), the whole conversation so far in front of it:

* ``chat``: the conversation as chat ``messages`` (``[INST]`` turns, or the training chat template), token for
  token as :func:`lit_ft.data.formats.format_prompt` renders a training prompt;
* ``alpaca`` (and ``raw``): these templates have no multi-turn form, so earlier turns are complete exchanges one
  after the other, each answer closed by EOS as in the training data, then the new prompt.

The answer streams as it is generated. The history is bounded: when a turn's context (BOS, earlier turns, the new
message) would exceed ``--max_context`` minus ``--max_new_tokens`` tokens, the oldest turns are dropped, and the
chat says how many. ``/reset`` clears the history, ``/exit`` (or Ctrl-D) leaves, Ctrl-C stops an answer.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lit_ft.backbone import BackboneError
from lit_ft.backbone.base_record import BaseRecord
from lit_ft.cli import ToolParser
from lit_ft.data.formats import Segment, _encode_segments, format_alpaca_prompt, format_prompt
from lit_ft.errors import ConfigError
from lit_ft.tools.generate import (
    Sampling,
    adapter_source,
    add_model_flags,
    add_sampling_flags,
    generate_one,
    sampling_from,
    trained_prompt_format,
)
from lit_ft.tools.loading import add_loading_flags, base_spec, describe, load_with_adapter

PROMPT = ">>> "  # what the chat prints when it waits for a message
COMMANDS = "/reset clears the history, /exit leaves"
# 4096: Mistral-7B-v0.1's sliding attention window; a longer context slows every turn and goes past what SFT
# trained on. A model with fewer positions (the embedded one has 2048) caps it lower.
DEFAULT_MAX_CONTEXT = 4096


@dataclass
class Turn:
    """One exchange: what the user typed and what the model answered."""

    user: str
    assistant: str


def render(turns: list[Turn], message: str, tokenizer: Any, fmt: str = "alpaca",
           chat_template: str | None = None) -> tuple[str, list[int]]:
    """(text, ids with BOS) of the context that the model continues to answer ``message`` after ``turns``."""
    if fmt == "chat":
        messages = []
        for turn in turns:
            messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        prompt = format_prompt({"messages": [*messages, {"role": "user", "content": message}]}, tokenizer, "chat",
                               chat_template)
        return prompt.text, prompt.input_ids
    template = format_alpaca_prompt if fmt == "alpaca" else str
    segments = []
    for turn in turns:
        segments += [Segment(template(turn.user), False), Segment(turn.assistant, True, eos=True)]
    segments.append(Segment(template(message), False))
    ids = [tokenizer.bos_token_id]
    for part in _encode_segments(segments, tokenizer):
        ids.extend(part)
    eos = getattr(tokenizer, "eos_token", None) or ""
    return "".join(s.text + (eos if s.eos else "") for s in segments), ids


class Conversation:
    """The turns so far, rendered within a token budget (the oldest turns dropped to fit)."""

    def __init__(self, tokenizer: Any, fmt: str, chat_template: str | None, budget: int):
        self.tokenizer, self.fmt, self.chat_template, self.budget = tokenizer, fmt, chat_template, budget
        self.turns: list[Turn] = []

    def context(self, message: str) -> tuple[str, list[int], int]:
        """(text, ids, turns dropped) for ``message``: as many of the latest turns as fit in the budget. The
        dropped turns leave the history for good. Raises ConfigError when the message alone does not fit."""
        dropped = 0
        while True:
            text, ids = render(self.turns, message, self.tokenizer, self.fmt, self.chat_template)
            if len(ids) <= self.budget:
                return text, ids, dropped
            if not self.turns:
                raise ConfigError(f"the message is {len(ids)} tokens with its template, over the {self.budget}-token "
                                  "budget (--max_context minus --max_new_tokens)")
            self.turns.pop(0)
            dropped += 1

    def add(self, message: str, answer: str) -> None:
        self.turns.append(Turn(message, answer))

    def reset(self) -> None:
        self.turns = []


class _Streamer:
    """Prints each new token's text as soon as it decodes to whole characters (transformers' streamer protocol:
    ``put`` receives the prompt first, then each new token; ``end`` after the last)."""

    def __init__(self, tokenizer: Any, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.shown:] + "\n")
        self.out.flush()


def answer(model: Any, tokenizer: Any, ids: list[int], sampling: Sampling, stream: bool = True) -> str:
    """The model's answer to the context ``ids`` (printed as it is generated when ``stream``)."""
    return generate_one(model, tokenizer, ids, sampling, _Streamer(tokenizer) if stream else None).strip()


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog="lit-ft chat", description="Chat with an adapter or a merged model.")
    add_model_flags(parser, model_help="a plain transformers model directory (a merged export, or a base)",
                    base_help="the base model under --adapter (default: the adapter's own)")
    parser.add_argument("--max_context", type=int,
                        help=f"tokens of context per turn, the answer included; older turns are dropped to fit "
                             f"(default: {DEFAULT_MAX_CONTEXT}, or the model's positions when fewer)")
    parser.add_argument("--show_context", action="store_true",
                        help="print each turn's context as the model sees it (the template at work)")
    add_sampling_flags(parser, Sampling(max_new_tokens=256))  # 256: a paragraph; the embedded tasks need under 10
    add_loading_flags(parser)
    return parser


def _source(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, str | None, BaseRecord | None]:
    """(base or model, adapter, the adapter's record)."""
    if bool(args.adapter) == bool(args.model):
        parser.error("give --adapter or --model (one of them)")
    if args.model:
        if not Path(args.model).is_dir():
            raise BackboneError(f"{args.model}: model directory not found")
        return args.model, None, None
    base, record = adapter_source(args.adapter, args.base)
    return base, args.adapter, record


def _budget(args: argparse.Namespace, model: Any) -> int:
    positions = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    limit = args.max_context or min(DEFAULT_MAX_CONTEXT, positions)
    if limit > positions:
        raise ConfigError(f"--max_context {limit} is more than the model's {positions} positions")
    if limit - args.max_new_tokens < 1:
        raise ConfigError(f"--max_context {limit} leaves no room for a message after --max_new_tokens "
                          f"{args.max_new_tokens}")
    return limit - args.max_new_tokens


def _read(prompt: str) -> str | None:
    """A line from the user; None at end of input (Ctrl-D) or Ctrl-C."""
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def main(argv: list[str] | None = None) -> list[Turn]:
    """Run the chat until /exit or end of input; returns the history at the end."""
    parser = build_parser()
    args = parser.parse_args(argv)
    source, adapter, record = _source(args, parser)
    sampling = sampling_from(args)
    trained_format, trained_template = trained_prompt_format(record, args.model)
    fmt = args.format or trained_format or "alpaca"
    spec = base_spec(source, record, args.dtype, args.load_in_4bit)
    model, tokenizer = load_with_adapter(spec, adapter)
    conversation = Conversation(tokenizer, fmt, args.chat_template or trained_template, _budget(args, model))
    print(f"lit-ft chat: {source} loaded as {describe(spec)}" + (f", adapter {adapter}" if adapter else "")
          + f"; {fmt} template; history up to {conversation.budget} tokens; {COMMANDS}", file=sys.stderr)
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    torch.manual_seed(sampling.seed)
    while True:
        message = _read(PROMPT)
        if message is None or message.strip() in ("/exit", "/quit"):
            return conversation.turns
        message = message.strip()
        if not message:
            continue
        if message == "/reset":
            conversation.reset()
            print("(history cleared)")
            continue
        if message.startswith("/"):
            print(f"(unknown command {message.split()[0]}: {COMMANDS})")
            continue
        try:
            text, ids, dropped = conversation.context(message)
        except ConfigError as err:
            print(f"({err}; not sent)")
            continue
        if dropped:
            print(f"(history: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the "
                  f"{conversation.budget}-token budget; {len(conversation.turns)} kept)")
        if args.show_context:
            print(f"--- context, {len(ids)} tokens ---\n{text}\n--- end of context ---")
        try:
            reply = answer(model, tokenizer, ids, sampling)
        except KeyboardInterrupt:
            print("\n(answer stopped; not kept in the history)")
            continue
        conversation.add(message, reply)
