"""``lit-ft pairs``: sample a policy's responses, rank them with a judge, and write the preference pairs (JSONL).

    lit-ft pairs --adapter artifacts/sft/adapter --embedded train --extra_facts 4000 --out artifacts/pairs/train.jsonl
    lit-ft pairs --adapter artifacts/sft/adapter --embedded heldout --out artifacts/pairs/heldout.jsonl
    lit-ft pairs --adapter out/sft --file prompts.jsonl --judge my_pkg.judges.Rubric --samples 4 --out pairs.jsonl

This is how InstructGPT's labellers and Gao et al.'s gold reward model made their reward models' data: the SFT
policy answers each prompt ``--samples`` times, a judge ranks the answers, and every two *distinct* answers the
judge ranks differently become one pair, the better one ``chosen`` (``K`` answers with ``K`` different scores give
``K(K-1)/2`` pairs). The pairs are the comparisons PPO's rollouts later ask the reward model to make, since they are
the policy's own answers; a pair made by hand (a near miss written for a fact) can test what the policy never says.

The judge is any class with ``__call__(prompts, responses) -> tensor`` (:class:`lit_ft.rl.rewards.ProgrammaticReward`,
as PPO's ``model.rewards``), given by its class path and built without arguments. The default,
:class:`lit_ft.rl.rewards.GoldReward`, is the embedded world's hidden gold judge. Sampling is the RL stages' own
loop (:func:`lit_ft.rl.rollout.sample`: the prompt prefilled once for its samples), seeded, so a run can be repeated.

Prompts come from the embedded world (``--embedded train``: the SFT training questions, plus ``--extra_facts``
fresh questions that are never a held-out one; ``--embedded heldout``: the held-out questions, for the reward
model's validation only) or from a file of records (``instruction`` and ``input``, ``prompt``, or chat
``messages``), rendered as the adapter was trained. Each output line holds the prompt as the preference formats
render it the same way (``instruction`` and ``input`` for Alpaca prompts; ``prompt``, the messages before the
answer, for chat ones; :func:`pair_prompt`), ``task`` when the row has one, ``chosen``, ``rejected`` and the
judge's ``chosen_score`` and ``rejected_score``: the records :class:`lit_ft.data.preference.PreferenceDataModule`
reads.
The file is written whole or not at all (``OUT.partial`` until the last prompt).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import itertools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lit_ft.cli import ToolParser
from lit_ft.data.formats import Prompt
from lit_ft.data.sources import Location
from lit_ft.errors import ConfigError
from lit_ft.padding import pad_rows
from lit_ft.rl.rollout import sample
from lit_ft.tools.generate import (
    add_model_flags,
    build_prompts,
    models_to_load,
    prompt_record,
    prompt_rows,
    trained_prompt_format,
)
from lit_ft.tools.loading import add_loading_flags, base_spec, describe, load_with_adapter


def ranked_pairs(responses: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str, float, float]]:
    """(chosen, rejected, chosen score, rejected score) for every two distinct responses with different scores.

    Responses are compared once each: a repeated response keeps its first score (a judge that scores one text two
    ways is not asked to break the tie), and one the judge could not score (NaN, infinite) is left out. Pairs come
    in the order of first appearance, the better one first.
    """
    first: dict[str, float] = {}
    for response, score in zip(responses, scores):
        if math.isfinite(score):
            first.setdefault(response, float(score))
    out = []
    for (a, sa), (b, sb) in itertools.combinations(first.items(), 2):
        if sa != sb:
            out.append((a, b, sa, sb) if sa > sb else (b, a, sb, sa))
    return out


def pair_prompt(row: dict, fmt: str, location: Location | None = None) -> dict:
    """The prompt fields of ``row``'s pairs, in the preference format that renders the prompt the policy was given:
    ``instruction`` and ``input`` (alpaca), ``prompt`` as the conversation before the answer (chat: the row's
    messages up to its last user turn), or ``prompt`` as text (raw); ``task`` is kept when the row has one."""
    rendered = prompt_record(row, fmt, location)
    if fmt == "alpaca":
        fields: dict[str, Any] = {"instruction": rendered["instruction"], "input": rendered["input"]}
    elif fmt == "chat":
        messages = list(rendered["messages"])
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        fields = {"prompt": messages}
    else:
        fields = {"prompt": rendered["prompt"]}
    if "task" in row:
        fields["task"] = row["task"]
    return fields


def load_judge(path: str) -> Any:
    """The judge at ``module.Class``, built without arguments; a path that names nothing callable is one line."""
    module, _, name = path.rpartition(".")
    try:
        judge = getattr(importlib.import_module(module), name)() if module else None
    except (ImportError, AttributeError, TypeError) as err:
        raise ConfigError(f"--judge {path}: cannot build it ({type(err).__name__}: {err})") from None
    if not callable(judge):
        raise ConfigError(f"--judge {path}: expected a class whose instances score (prompts, responses)")
    return judge


def embedded_rows(split: str, extra_facts: int) -> tuple[list[dict], list[Location]]:
    """The embedded world's prompt records: the SFT training questions plus ``extra_facts`` fresh ones
    (``train``), or the held-out questions (``heldout``)."""
    from lit_ft.data.embedded import EmbeddedWorld, PromptSettings

    splits = EmbeddedWorld(prompts=PromptSettings(extra_facts=extra_facts)).splits("prompt")
    rows = splits.train if split == "train" else splits.val
    return rows, [Location(f"embedded {split}", row=i) for i in range(len(rows))]


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog="lit-ft pairs", description="Sample a policy's responses, rank them with a judge, and "
                                                        "write the preference pairs (JSONL).")
    add_model_flags(parser, model_help="a plain transformers model directory (a merged export)",
                    base_help="the base model under --adapter (default: the adapter's own)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embedded", choices=("train", "heldout"),
                        help="the embedded world's SFT training questions or its held-out questions")
    source.add_argument("--file", help="prompts: one a line (.txt) or records (.json, .jsonl, .parquet)")
    parser.add_argument("--extra_facts", type=int, default=0,
                        help="with --embedded train: fresh questions of the same tasks, never a held-out one")
    parser.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts (default: all)")
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--judge", default="lit_ft.rl.rewards.GoldReward",
                        help="class path of the judge (default: the embedded world's hidden gold judge)")
    # 8 samples at 0.7: PPO's temperature in the embedded configs; 8 answers give the SFT policy's ~2 pairs a prompt
    parser.add_argument("--samples", type=int, default=8, help="responses sampled per prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=20, help="20: the embedded PPO's response length")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch_size", type=int, default=32, help="prompts sampled at once (times --samples rows)")
    add_loading_flags(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Settings that cannot work are one line, before any model loads."""
    for name, low in (("samples", 2), ("max_new_tokens", 1), ("batch_size", 1), ("extra_facts", 0)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} must be at least {low}, got {getattr(args, name)}")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ConfigError(f"--max_prompts must be at least 1, got {args.max_prompts}")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be positive, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.extra_facts and args.embedded != "train":
        raise ConfigError("--extra_facts adds training questions: it needs --embedded train")


def partial_file(out: Path) -> Path:
    """``OUT.partial``, created (with OUT's folder) before any model loads: a place that cannot be written is one
    line, not a traceback after the sampling."""
    partial = out.with_name(out.name + ".partial")
    try:
        if out.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.open("w").close()
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write it ({err.strerror or err})") from None
    return partial


def write_pairs(model: Any, tokenizer: Any, rows: list[dict], prompts: list[Prompt], judge: Any,
                args: argparse.Namespace, out: Path, fmt: str) -> Counter:
    """Sample, judge and write every prompt's pairs to ``out`` (through ``OUT.partial``); returns the counts."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(args.seed)
    counts: Counter = Counter()
    partial = partial_file(out)
    with partial.open("w") as file, tqdm(total=len(prompts), desc="pairs: sampling", unit="prompt") as bar:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            ids, mask = pad_rows([p.input_ids for p in batch], tokenizer.pad_token_id, "left")
            samples = sample(model, ids.to(device), mask.to(device), args.max_new_tokens, tokenizer.eos_token_id,
                             tokenizer.pad_token_id, args.temperature, args.top_p, generator,
                             num_samples=args.samples)
            texts = [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True).strip()
                     for row, m in zip(samples.tokens.cpu(), samples.mask.cpu())]
            scores = torch.as_tensor(judge([p for p in batch for _ in range(args.samples)], texts),
                                     dtype=torch.float64).flatten().tolist()
            if len(scores) != len(texts):
                raise ConfigError(f"--judge {args.judge}: gave {len(scores)} scores for {len(texts)} responses")
            for i, prompt in enumerate(batch):
                row = rows[start + i]
                span = slice(i * args.samples, (i + 1) * args.samples)
                found = ranked_pairs(texts[span], scores[span])
                counts["prompts"] += 1
                counts["prompts without a pair"] += not found
                fields = pair_prompt(row, fmt) if found else {}
                for chosen, rejected, high, low in found:
                    record = {**fields, "chosen": chosen, "rejected": rejected, "chosen_score": high,
                              "rejected_score": low}
                    file.write(json.dumps(record) + "\n")
                    counts["pairs"] += 1
                    counts[f"scores {high:g} > {low:g}"] += 1
                    if "task" in row:
                        counts[f"task {row['task']}"] += 1
            bar.update(len(batch))
    partial.replace(out)
    return counts


def main(argv: list[str] | None = None) -> Counter:
    """Parse arguments, sample, judge, write; returns the counts it prints."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args)
    judge = load_judge(args.judge)
    partial_file(Path(args.out)).unlink()  # writable: checked before the model loads
    source, adapter, record = models_to_load(args, parser)
    trained_format, trained_template = trained_prompt_format(record, args.model)
    fmt = args.format or trained_format or "alpaca"
    rows, locations = embedded_rows(args.embedded, args.extra_facts) if args.embedded else \
        prompt_rows(None, args.file)
    rows, locations = rows[: args.max_prompts], locations[: args.max_prompts]
    spec = base_spec(source, record, args.dtype, args.load_in_4bit)
    print(f"lit-ft pairs: {source} loaded as {describe(spec)}" + (f", adapter {adapter}" if adapter else "")
          + f"; {len(rows):,} {fmt} prompts x {args.samples} samples at temperature {args.temperature}; judge "
          f"{args.judge}", file=sys.stderr)
    model, tokenizer = load_with_adapter(spec, adapter)
    prompts = build_prompts(rows, tokenizer, fmt, args.chat_template or trained_template, locations)
    began = time.perf_counter()
    counts = write_pairs(model, tokenizer, rows, prompts, judge, args, Path(args.out), fmt)
    detail = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()) if k not in ("prompts", "pairs"))
    print(f"lit-ft pairs: {counts['pairs']:,} pairs from {counts['prompts']:,} prompts in "
          f"{time.perf_counter() - began:.0f} s -> {args.out} ({detail})")
    return counts


if __name__ == "__main__":
    main()
