"""``lit-ft generate``: text from a base model, an adapter on its base, or a merged export, prompted as in training.

    lit-ft generate --adapter artifacts/sft/adapter --prompt "What is 3 + 4?"            # streams the answer
    lit-ft generate --adapter artifacts/sft/adapter --file prompts.jsonl --compare       # base vs tuned, a table
    lit-ft generate --model artifacts/sft/merged --prompt "Sort the digits: 3 1 2" --sample --temperature 0.7
    lit-ft generate --model artifacts/sft/merged --base artifacts/base/tiny-mistral --prompt "..." --compare

Prompts are rendered with the training templates of :mod:`lit_ft.data.formats` (``--format alpaca``, the SFT
default, or ``chat`` for the tokenizer's chat template) and start with BOS, token for token as in training. A file
holds one prompt a line (``.txt``) or records (JSON / JSON lines / parquet) with ``instruction`` (and ``input``),
``prompt`` or chat ``messages``; an ``output``/``completion`` (or a final assistant message) is shown as the
reference. ``--compare`` runs the same prompts through the base (the adapter disabled) and the tuned model and
prints them side by side: the "before instruction tuning / after instruction tuning" table.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lit_ft.backbone import Backbone, BackboneError, build_model, load_adapter, load_tokenizer
from lit_ft.callbacks.evaluation import greedy_generate
from lit_ft.data.formats import Prompt, format_prompt
from lit_ft.data.sources import DataError, Location, load_records_with_locations
from lit_ft.metrics import exact_match

PROMPT_FORMATS = ("alpaca", "chat", "raw")


def adapter_base(adapter: str | Path) -> str | None:
    """The base model an adapter directory was trained on (``base_model_name_or_path`` of its config)."""
    config = Path(adapter) / "adapter_config.json"
    if not config.exists():
        raise BackboneError(f"{adapter}: adapter directory not found (no adapter_config.json)")
    return json.loads(config.read_text()).get("base_model_name_or_path") or None


def default_compute_dtype() -> str:
    """4-bit matmuls in bfloat16 on a GPU (QLoRA), float32 on CPU (no fast bf16 matmul there)."""
    return "bfloat16" if torch.cuda.is_available() else "float32"


def load_causal_lm(pretrained: str, adapter: str | None = None, quantization: str = "none", dtype: str = "float32",
                   compute_dtype: str | None = None, tokenizer: str | None = None):
    """A base model (loaded like :func:`lit_ft.backbone.build_model` loads it for training), with ``adapter`` on it.

    The tokenizer comes from ``tokenizer``, else the adapter directory when it holds one, else the base.
    Returns ``(model, tokenizer)``, the model in eval mode with its KV cache on.
    """
    if tokenizer is None and adapter is not None and (Path(adapter) / "tokenizer_config.json").exists():
        tokenizer = str(adapter)
    tok = load_tokenizer(tokenizer or pretrained)
    spec = Backbone(pretrained=pretrained, quantization=quantization, dtype=dtype,
                    compute_dtype=compute_dtype or default_compute_dtype(), lora=None)
    on_gpu = torch.cuda.is_available()
    model = build_model(spec, tok, device_map={"": "cuda:0"} if on_gpu and quantization != "none" else None)
    if on_gpu and quantization == "none":
        model = model.to("cuda")
    if adapter is not None:
        model = load_adapter(model, str(adapter), "tuned")
    model.eval()
    model.config.use_cache = True  # build_model turns it off for training
    return model, tok


# ------------------------------------------------------------------------------------------------ prompts
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
        extra = row.get("input") or ""
        return {"messages": [{"role": "user", "content": f"{text}\n\n{extra}" if extra.strip() else text}]}
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


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[Prompt], sampling: Sampling, stream: bool = False,
                   batch_size: int = 16) -> list[str]:
    """Completions of ``prompts`` (the new text only). Greedy without streaming runs batched
    (:func:`lit_ft.callbacks.evaluation.greedy_generate`); streaming or sampling goes one prompt at a time,
    printing tokens as they come when ``stream``."""
    ids = [p.input_ids for p in prompts]
    if not sampling.do_sample and not stream:
        return greedy_generate(model, tokenizer, ids, sampling.max_new_tokens, batch_size)
    from transformers import TextStreamer

    torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    extra: dict[str, Any] = {"do_sample": False}
    if sampling.do_sample:
        extra = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                 "top_k": sampling.top_k}
    texts = []
    for prompt_ids in ids:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        inputs = torch.tensor([prompt_ids], device=device)
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), streamer=streamer,
                             max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, use_cache=True, **extra)
        texts.append(tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True))
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
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-ft generate",
                                     description="Generate from a base model, an adapter or a merged export.")
    parser.add_argument("--adapter", help="a PEFT adapter directory (its base is read from adapter_config.json)")
    parser.add_argument("--model", help="a plain transformers model directory (a base or a merged export)")
    parser.add_argument("--base", help="the base model: under --adapter (default: the adapter's own), alone, or "
                                       "as the 'before' side of --model --compare")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    parser.add_argument("--input", default="", help="the Alpaca input field for --prompt")
    parser.add_argument("--file", help="prompts: one a line (.txt) or records (.json, .jsonl, .parquet)")
    parser.add_argument("--format", choices=PROMPT_FORMATS, default="alpaca",
                        help="prompt template: alpaca (the SFT default), chat (the tokenizer's chat template), raw")
    parser.add_argument("--chat_template", help="a Jinja chat template for --format chat")
    parser.add_argument("--compare", action="store_true", help="base vs tuned outputs side by side, as a table")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    defaults = Sampling()
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top_p", type=float, default=defaults.top_p)
    parser.add_argument("--top_k", type=int, default=defaults.top_k)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no_stream", action="store_true", help="print each answer when done, not token by token")
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none", help="load the base in 4 bits")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the weights (float32: exact on CPU; bfloat16 halves GPU memory)")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts generated at once (greedy, no stream)")
    return parser


def _models_to_load(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, str | None]:
    """(base, adapter) for the tuned side, or (model, None) for a plain model."""
    if args.adapter and args.model:
        parser.error("give --adapter or --model, not both")
    if args.adapter:
        base = args.base or adapter_base(args.adapter)
        if not base:
            raise BackboneError(f"{args.adapter}: the adapter does not name its base model; pass --base")
        return base, args.adapter
    if args.model or args.base:
        if args.compare and not (args.model and args.base):
            parser.error("--compare needs --adapter, or --model with --base")
        return args.model or args.base, None
    parser.error("give --adapter, --model or --base")
    raise AssertionError  # parser.error exits


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, generate, print; returns one dict per prompt (prompt, reference, generation[, base])."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.file is None) == (args.prompt is None):
        parser.error("give either --prompt (repeatable) or --file")
    source, adapter = _models_to_load(args, parser)
    sampling = Sampling(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.top_k, args.seed)
    rows, locations = prompt_rows(args.prompt, args.file, args.input)
    model, tokenizer = load_causal_lm(source, adapter, args.quantization, args.dtype)
    prompts = build_prompts(rows, tokenizer, args.format, args.chat_template, locations)
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
        base_model, base_tokenizer = load_causal_lm(args.base, None, args.quantization, args.dtype)
        base_prompts = build_prompts(rows, base_tokenizer, args.format, args.chat_template, locations)
        base = generate_texts(base_model, base_tokenizer, base_prompts, sampling, batch_size=args.batch_size)
    from rich.console import Console

    Console(width=max(120, Console().width)).print(comparison_table(rows, base, tuned, references))
    if any(references):
        hits = [(exact_match(b, r), exact_match(t, r)) for b, t, r in zip(base, tuned, references) if r]
        print(f"exact match: base {sum(h[0] for h in hits)}/{len(hits)}, tuned {sum(h[1] for h in hits)}/{len(hits)}")
    for result, b, t in zip(results, base, tuned):
        result.update(base=b, generation=t)
    return results
