"""``lit-ft score``: score (prompt, response) pairs with an exported reward model and print a table.

    lit-ft score --adapter artifacts/rm --prompt "What is 3 + 4?" --response 7 --response 8
    lit-ft score --adapter artifacts/rm --file pairs.jsonl

The base loads as the reward model was trained (``lit_ft_base.json``: NF4 with bfloat16 compute for a QLoRA
adapter); ``--dtype`` and ``--load-in-4bit/--no-load-in-4bit`` override that (:mod:`lit_ft.tools.loading`).
Prompts are rendered the way the reward model was trained (``prompt_format`` in ``reward_stats.json``): the SFT
Alpaca prompt for the embedded model, chat turns otherwise. A file holds one JSON object a line with ``prompt``
(a string, an HH-form ``"\\n\\nHuman: ...\\n\\nAssistant:"`` string, or chat messages) or ``instruction`` (and
``input``), plus ``response``.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

from lit_ft.backbone import BackboneError
from lit_ft.backbone.base_record import BaseRecord
from lit_ft.data.preference_formats import (
    EmptyResponse,
    PreferencePair,
    encode_prompt_response,
    truncate_pair,
)
from lit_ft.data.sources import DataError, Location, load_records_with_locations
from lit_ft.padding import pad_rows
from lit_ft.stages.reward_model import STATS_FILE, RewardScorer, load_reward_model
from lit_ft.tools.loading import add_loading_flags, base_spec, describe, load_base, tokenizer_source

PROMPT_FORMATS = ("alpaca", "chat")


def encode_row(row: dict, tokenizer: Any, prompt_format: str, chat_template: str | None = None,
               max_seq_length: int | None = None, location: Location | None = None) -> list[int]:
    """Token ids of one (prompt, response) row, rendered as in training; an overlong prompt is cut from the left."""
    response = row.get("response")
    if not isinstance(response, str):
        raise DataError("missing" if response is None else "expected a string", location, "response")
    if prompt_format == "alpaca":
        instruction = row.get("instruction", row.get("prompt"))
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError("expected a non-empty string", location, "instruction" if "instruction" in row else "prompt")
        prompt: Any = instruction
        alpaca_input = row.get("input") or ""
    else:
        prompt, alpaca_input = row.get("prompt"), None
        if prompt is None:
            raise DataError("missing", location, "prompt")
    try:
        prompt_ids, response_ids = encode_prompt_response(prompt, response, tokenizer, chat_template, location,
                                                          alpaca_input)
    except EmptyResponse:
        raise DataError("empty response", location, "response") from None
    pair = PreferencePair(prompt_ids, response_ids, response_ids)
    if max_seq_length is not None:
        fitted = truncate_pair(pair, max_seq_length)
        if fitted is None:
            raise DataError(f"the response alone is longer than max_seq_length={max_seq_length}", location,
                            "response")
        pair = fitted
    return pair.prompt_ids + pair.chosen_ids


@torch.no_grad()
def score_rows(scorer: RewardScorer, tokenizer: Any, rows: list[dict], prompt_format: str,
               chat_template: str | None = None, batch_size: int = 16, max_seq_length: int | None = None,
               locations: list[Location] | None = None) -> list[float]:
    """Raw rewards of ``rows`` (dicts with ``prompt`` or ``instruction``/``input``, and ``response``)."""
    sequences = [encode_row(row, tokenizer, prompt_format, chat_template, max_seq_length,
                            locations[i] if locations else None) for i, row in enumerate(rows)]
    device = scorer.head.weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    scorer.model.eval()
    rewards: list[float] = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_rows(sequences[start:start + batch_size], pad)
        rewards += scorer(ids.to(device), mask.to(device)).tolist()
    return rewards


def load_scorer(adapter: str, base: str | None = None, dtype: str | None = None,
                load_in_4bit: bool | None = None) -> tuple[RewardScorer, Any]:
    """The exported reward model in ``adapter`` on its base model, loaded as it was trained (``base``, ``dtype``
    and ``load_in_4bit`` override the recorded base and how it loads)."""
    directory = Path(adapter)
    stats_path = directory / STATS_FILE
    if not stats_path.exists():
        raise BackboneError(f"{directory}: not a reward model export ({STATS_FILE} is missing)")
    stats = json.loads(stats_path.read_text())
    record = BaseRecord.read(directory)
    base = base or (record.pretrained if record else None) or stats.get("base_model")
    if not base:
        raise BackboneError(f"{directory}: the export does not name its base model; pass --base")
    spec = base_spec(base, record, dtype, load_in_4bit)
    print(f"lit-ft score: {base} loaded as {describe(spec)}, reward model {directory}", file=sys.stderr)
    model, tokenizer = load_base(spec, tokenizer_source(spec, directory))
    return load_reward_model(model, directory), tokenizer


def _cell(value: Any, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = repr(text)[1:-1]
    return textwrap.shorten(text, width, placeholder="...") if len(text) > width else text


def format_table(rows: list[dict], rewards: list[float], mean: float, std: float, width: int = 48) -> str:
    """One line per row: index, reward, normalised reward, prompt (its end), response."""
    lines = [f"{'#':>3}  {'reward':>8}  {'normalised':>10}  {'prompt':<{width}}  response"]
    for i, (row, reward) in enumerate(zip(rows, rewards), start=1):
        prompt = row.get("instruction", row.get("prompt", ""))
        if isinstance(prompt, str) and len(prompt) > width:
            prompt = "..." + prompt[-(width - 3):]  # the end of a long prompt is its question
        normalised = (reward - mean) / max(std, 1e-6)
        lines.append(f"{i:>3}  {reward:>8.3f}  {normalised:>10.3f}  {_cell(prompt, width):<{width}}  "
                     f"{_cell(row.get('response', ''), width)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-ft score", description="Score (prompt, response) pairs with an exported reward model.")
    parser.add_argument("--adapter", required=True, help="the reward model export (e.g. artifacts/rm)")
    parser.add_argument("--base", help="base model (default: the one recorded in reward_stats.json)")
    parser.add_argument("--prompt", help="one prompt (an instruction for Alpaca-format models)")
    parser.add_argument("--response", action="append", help="a response to --prompt (repeat to compare several)")
    parser.add_argument("--input", default="", help="the Alpaca input field, for Alpaca-format models")
    parser.add_argument("--file", help="JSON lines with prompt (or instruction/input) and response")
    parser.add_argument("--format", choices=PROMPT_FORMATS,
                        help="how prompts are rendered (default: as in training, from reward_stats.json)")
    parser.add_argument("--chat_template", help="Jinja chat template (default: as in training)")
    add_loading_flags(parser)
    parser.add_argument("--max_seq_length", type=int, help="cut longer prompts from the left")
    parser.add_argument("--batch_size", type=int, default=16)
    return parser


def main(argv: list[str] | None = None) -> list[float]:
    """Parse arguments, score, print the table; returns the raw rewards."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.file is None) == (args.prompt is None):
        parser.error("give either --prompt with --response, or --file")
    if args.prompt is not None and not args.response:
        parser.error("--prompt needs at least one --response")
    if args.file is not None:
        rows, locations = load_records_with_locations(args.file)
        if not rows:
            raise DataError("no records", args.file)
    else:
        rows = [{"prompt": args.prompt, "input": args.input, "response": r} for r in args.response]
        locations = [Location("--response", row=i) for i in range(len(rows))]
    scorer, tokenizer = load_scorer(args.adapter, args.base, args.dtype, args.load_in_4bit)
    stats = scorer.stats
    prompt_format = args.format or stats.get("prompt_format") or "chat"
    template = args.chat_template or stats.get("chat_template")
    rewards = score_rows(scorer, tokenizer, rows, prompt_format, template, args.batch_size, args.max_seq_length,
                         locations)
    print(f"reward model {args.adapter} (adapter '{scorer.adapter_name}', {prompt_format} prompts); normalised = "
          f"(reward - {float(scorer.reward_mean):.3f}) / {float(scorer.reward_std):.3f}")
    print(format_table(rows, rewards, float(scorer.reward_mean), float(scorer.reward_std)))
    return rewards
