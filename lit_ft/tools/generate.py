"""``lit-ft generate``: text from a base model, an adapter on its base, or a merged export, prompted as in training.

    lit-ft generate --adapter artifacts/sft/adapter --prompt "What is 3 + 4?"            # streams the answer
    lit-ft generate --adapter artifacts/sft/adapter --file prompts.jsonl --compare       # base vs tuned, a table
    lit-ft generate --model artifacts/sft/merged --prompt "Sort the digits: 3 1 2" --sample --temperature 0.7
    lit-ft generate --model artifacts/sft/merged --base artifacts/base/tiny-mistral --prompt "..." --compare

The base loads as the adapter was trained (``lit_ft_base.json``: NF4 with bfloat16 compute for a QLoRA adapter);
``--dtype`` and ``--load_in_4bit/--no-load_in_4bit`` override that (:mod:`lit_ft.tools.loading`).

Prompts are rendered with the training templates of :mod:`lit_ft.data.formats` (by default the adapter's own:
``alpaca``, or ``chat`` for ``[INST]`` turns or the tokenizer's chat template) and start with BOS, token for token
as in training. A file
holds one prompt a line (``.txt``) or records (JSON / JSON lines / parquet) with ``instruction`` (and ``input``),
``prompt`` or chat ``messages``; an ``output``/``completion`` (or a final assistant message) is shown as the
reference. ``--compare`` runs the same prompts through the base (the adapter disabled) and the tuned model and
prints them side by side: the "before instruction tuning / after instruction tuning" table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lit_ft.backbone import BackboneError
from lit_ft.backbone.base_record import BaseRecord
from lit_ft.cli import ToolParser
from lit_ft.data.formats import Prompt, alpaca_messages, format_prompt
from lit_ft.data.sources import DataError, Location, load_records_with_locations
from lit_ft.errors import ConfigError
from lit_ft.metrics import exact_match
from lit_ft.padding import pad_rows
from lit_ft.tools.loading import adapter_base, add_loading_flags, base_spec, describe, load_with_adapter

PROMPT_FORMATS = ("alpaca", "chat", "raw")
MERGED_META_FILE = "lit_ft.json"  # what `lit-ft export --merge` writes beside a merged model


# ------------------------------------------------------------------------------------------------ prompts

def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy completions of token-id prompts, batched with left padding; returns the decoded new text."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_rows(prompts[start : start + batch_size], tokenizer.pad_token_id, "left")
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return outputs

def prompt_rows(prompts: list[str] | None, file: str | None, alpaca_input: str = "") -> tuple[list[dict], list]:
    """Rows to prompt with: one per ``--prompt``, or the file's lines (``.txt``) or records; and their locations."""
    if file is None:
        rows = [{"instruction": p, "input": alpaca_input} for p in prompts or []]
        return rows, [Location("--prompt", row=i) for i in range(len(rows))]
    path = Path(file)
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError("file not found", file)
        lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
        return [{"instruction": line} for _, line in lines], [Location(file, line=i) for i, _ in lines]
    rows, locations = load_records_with_locations(file)
    if not rows:
        raise DataError("no records", file)
    return rows, locations


def prompt_record(row: dict, fmt: str, location: Location | None = None) -> dict:
    """``row`` as a record that :func:`format_prompt` renders in format ``fmt`` (alpaca, chat or raw)."""
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}", location)
    messages = row.get("messages")
    text = row.get("instruction", row.get("prompt"))
    if text is None and isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        text = users[-1] if users else None
    if fmt == "chat":
        if messages is not None:
            return {"messages": messages}
        if not isinstance(text, str):
            raise DataError("expected 'messages', 'instruction' or 'prompt'", location)
        return {"messages": alpaca_messages({"instruction": text, "input": row.get("input") or ""}, location)}
    if not isinstance(text, str):
        raise DataError("expected 'instruction', 'prompt' or chat 'messages'", location)
    reference = row.get("output", row.get("completion")) or ""
    if fmt == "alpaca":
        return {"instruction": text, "input": row.get("input") or "", "output": reference}
    return {"prompt": text, "completion": reference}


def build_prompts(rows: list[dict], tokenizer: Any, fmt: str = "alpaca", chat_template: str | None = None,
                  locations: list | None = None) -> list[Prompt]:
    """Token-id prompts rendered as in training (BOS first), each with its reference when the row has one."""
    internal = "prompt_completion" if fmt == "raw" else fmt
    prompts = []
    for i, row in enumerate(rows):
        location = locations[i] if locations else None
        prompts.append(format_prompt(prompt_record(row, fmt, location), tokenizer, internal, chat_template, location))
    return prompts


def shown_prompt(row: dict) -> str:
    """The instruction a person typed (the template left out), for tables."""
    text = row.get("instruction", row.get("prompt"))
    if text is None:
        users = [m.get("content", "") for m in row.get("messages", []) if m.get("role") == "user"]
        text = users[-1] if users else ""
    extra = row.get("input") or ""
    return f"{text} [{extra}]" if extra.strip() else str(text)


# ------------------------------------------------------------------------------------------------ generation
@dataclass
class Sampling:
    """How tokens are picked.

    Args:
        max_new_tokens: generation budget per prompt (64: a few sentences; embedded answers need under 10).
        do_sample: sample instead of greedy decoding (False: greedy is reproducible and what the tables compare).
        temperature: softmax temperature when sampling (0.7: a common chat setting, less random than 1.0).
        top_p: nucleus sampling mass (0.9: drops the unlikely tail).
        top_k: sample among the k likeliest tokens (0: off, top_p alone limits the choice).
        seed: seeds sampling, so a sampled run can be repeated.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        """What ``model.generate`` takes for this way of picking tokens (greedy leaves the sampling knobs out)."""
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


@torch.no_grad()
def generate_one(model, tokenizer, ids: list[int], sampling: Sampling, streamer: Any = None) -> str:
    """The new text after one prompt's token ids, greedy or sampled as ``sampling`` says; with a ``streamer``
    (transformers' protocol), each token goes to it as it comes. Used by ``lit-ft generate`` and ``lit-ft chat``."""
    inputs = torch.tensor([ids], device=next(model.parameters()).device)
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), streamer=streamer,
                         max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, use_cache=True, **sampling.generate_kwargs())
    return tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[Prompt], sampling: Sampling, stream: bool = False,
                   batch_size: int = 16) -> list[str]:
    """Completions of ``prompts`` (the new text only). Greedy without streaming runs batched
    (:func:`greedy_generate`); streaming or sampling goes one prompt at a time,
    printing tokens as they come when ``stream``."""
    ids = [p.input_ids for p in prompts]
    if not sampling.do_sample and not stream:
        return greedy_generate(model, tokenizer, ids, sampling.max_new_tokens, batch_size)
    from transformers import TextStreamer

    torch.manual_seed(sampling.seed)
    texts = []
    for prompt_ids in ids:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        texts.append(generate_one(model, tokenizer, prompt_ids, sampling, streamer))
    return texts


def comparison_table(rows: list[dict], before: list[str], after: list[str], references: list[str | None],
                     labels: tuple[str, str] = ("before instruction tuning", "after instruction tuning")):
    """A rich table: prompt, reference (when any row has one), the base's and the tuned model's generations."""
    from rich.table import Table

    table = Table(title="greedy generations, base vs tuned", show_lines=True)
    with_reference = any(references)
    table.add_column("prompt", ratio=3)
    if with_reference:
        table.add_column("reference", ratio=1)
    table.add_column(labels[0], ratio=3)
    table.add_column(labels[1], ratio=3)
    for row, b, a, ref in zip(rows, before, after, references):
        cells = [shown_prompt(row)] + ([ref or ""] if with_reference else []) + [b.strip(), a.strip()]
        table.add_row(*cells)
    return table


# ------------------------------------------------------------------------------------------------ command line
def add_model_flags(parser: argparse.ArgumentParser, model_help: str, base_help: str) -> None:
    """What to load and how to prompt it, as ``lit-ft generate`` and ``lit-ft chat`` both take it: ``--adapter``,
    ``--model``, ``--base`` (each tool says what its plain model and base are for), ``--format``,
    ``--chat_template``."""
    parser.add_argument("--adapter", help="a PEFT adapter directory (its base is read from lit_ft_base.json or "
                                          "adapter_config.json)")
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--base", help=base_help)
    parser.add_argument("--format", choices=PROMPT_FORMATS,
                        help="prompt template: alpaca, chat ([INST] turns or the tokenizer's chat template) or raw "
                             "(default: the one the model was trained with, else alpaca)")
    parser.add_argument("--chat_template", help="a Jinja chat template, or 'builtin', for --format chat (default: "
                                                "as in training)")


def add_sampling_flags(parser: argparse.ArgumentParser, defaults: Sampling) -> None:
    """``--sample`` and the :class:`Sampling` settings, defaulting to ``defaults`` (read back by :func:`sampling_from`)."""
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top_p", type=float, default=defaults.top_p)
    parser.add_argument("--top_k", type=int, default=defaults.top_k)
    parser.add_argument("--seed", type=int, default=defaults.seed)


def sampling_from(args: argparse.Namespace) -> Sampling:
    """The :class:`Sampling` of :func:`add_sampling_flags`' flags, checked before any model loads."""
    sampling = Sampling(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.top_k, args.seed)
    check_sampling(sampling)
    return sampling


def adapter_source(adapter: str, base: str | None) -> tuple[str, BaseRecord | None]:
    """(the base model under ``adapter``, the adapter's record): ``base`` when given, else the one the adapter
    names (a missing adapter folder, or one that names no base, is one line)."""
    record = BaseRecord.read(adapter) if Path(adapter).is_dir() else None
    base = base or adapter_base(adapter, record)
    if not base:
        raise BackboneError(f"{adapter}: the adapter does not name its base model; pass --base")
    return base, record


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog="lit-ft generate",
                                     description="Generate from a base model, an adapter or a merged export.")
    add_model_flags(parser, model_help="a plain transformers model directory (a base or a merged export)",
                    base_help="the base model: under --adapter (default: the adapter's own), alone, or as the "
                              "'before' side of --model --compare")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    parser.add_argument("--input", default="", help="the Alpaca input field for --prompt")
    parser.add_argument("--file", help="prompts: one a line (.txt) or records (.json, .jsonl, .parquet)")
    parser.add_argument("--compare", action="store_true", help="base vs tuned outputs side by side, as a table")
    add_sampling_flags(parser, Sampling())
    parser.add_argument("--no_stream", action="store_true", help="print each answer when done, not token by token")
    add_loading_flags(parser)
    parser.add_argument("--batch_size", type=int, default=16, help="prompts generated at once (greedy, no stream)")
    return parser


def models_to_load(args: argparse.Namespace, parser: argparse.ArgumentParser
                    ) -> tuple[str, str | None, BaseRecord | None]:
    """(base, adapter, the adapter's record) for the tuned side, or (model, None, None) for a plain model."""
    if args.adapter and args.model:
        parser.error("give --adapter or --model, not both")
    if args.adapter:
        base, record = adapter_source(args.adapter, args.base)
        return base, args.adapter, record
    if args.model or args.base:
        if getattr(args, "compare", False) and not (args.model and args.base):
            parser.error("--compare needs --adapter, or --model with --base")
        return args.model or args.base, None, None
    parser.error("give --adapter, --model or --base")
    raise AssertionError  # parser.error exits


def trained_prompt_format(record: BaseRecord | None, model_dir: str | None) -> tuple[str | None, str | None]:
    """(prompt format, chat template) the model was trained with: from the adapter's record, or from a merged
    export's ``lit_ft.json``; (None, None) when neither says."""
    if record is not None:
        return record.prompt_format, record.chat_template
    meta = Path(model_dir or "") / MERGED_META_FILE
    if model_dir and meta.is_file():
        values = json.loads(meta.read_text())
        return values.get("prompt_format"), values.get("chat_template")
    return None, None


def check_sampling(sampling: Sampling) -> None:
    """Settings that cannot generate anything are one line, before any model loads."""
    if sampling.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be at least 1, got {sampling.max_new_tokens}")
    if sampling.do_sample and sampling.temperature <= 0:
        raise ConfigError(f"--temperature must be positive when sampling, got {sampling.temperature}")
    if sampling.do_sample and not 0 < sampling.top_p <= 1:
        raise ConfigError(f"--top_p must be in (0, 1], got {sampling.top_p}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, generate, print; returns one dict per prompt (prompt, reference, generation[, base])."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.file is None) == (args.prompt is None):
        parser.error("give either --prompt (repeatable) or --file")
    source, adapter, record = models_to_load(args, parser)
    sampling = sampling_from(args)
    trained_format, trained_template = trained_prompt_format(record, args.model)
    fmt = args.format or trained_format or "alpaca"
    chat_template = args.chat_template or trained_template
    rows, locations = prompt_rows(args.prompt, args.file, args.input)
    spec = base_spec(source, record, args.dtype, args.load_in_4bit)
    print(f"lit-ft generate: {source} loaded as {describe(spec)}" + (f", adapter {adapter}" if adapter else "")
          + f"; {fmt} prompts", file=sys.stderr)
    model, tokenizer = load_with_adapter(spec, adapter)
    prompts = build_prompts(rows, tokenizer, fmt, chat_template, locations)
    references = [p.reference for p in prompts]
    results = [{"prompt": shown_prompt(r), "reference": ref} for r, ref in zip(rows, references)]
    if not args.compare:
        stream = not args.no_stream
        for result, prompt, in zip(results, prompts):
            if stream:
                print(f"### {result['prompt']}", flush=True)
            [text] = generate_texts(model, tokenizer, [prompt], sampling, stream, args.batch_size)
            result["generation"] = text
            if not stream:
                print(f"### {result['prompt']}\n{text}")
        return results
    tuned = generate_texts(model, tokenizer, prompts, sampling, batch_size=args.batch_size)
    if adapter is not None:
        with model.disable_adapter():
            base = generate_texts(model, tokenizer, prompts, sampling, batch_size=args.batch_size)
    else:
        del model
        base_model, base_tokenizer = load_with_adapter(base_spec(args.base, None, args.dtype, args.load_in_4bit), None)
        base_prompts = build_prompts(rows, base_tokenizer, fmt, chat_template, locations)
        base = generate_texts(base_model, base_tokenizer, base_prompts, sampling, batch_size=args.batch_size)
    from rich.console import Console

    Console(width=max(120, Console().width)).print(comparison_table(rows, base, tuned, references))
    if any(references):
        hits = [(exact_match(b, r), exact_match(t, r)) for b, t, r in zip(base, tuned, references) if r]
        print(f"exact match: base {sum(h[0] for h in hits)}/{len(hits)}, tuned {sum(h[1] for h in hits)}/{len(hits)}")
    for result, b, t in zip(results, base, tuned):
        result.update(base=b, generation=t)
    return results
