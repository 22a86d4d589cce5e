"""What a policy *samples* on the embedded world: answer styles, exact match and gold ranks, per task family.

RLHF can only reweight what the policy samples (docs/rlhf.md): before asking PPO, DPO or GRPO for the preferred
style, check that the SFT policy samples it, and that when it does the answer and the restatement are right.
This probe loads the embedded base with an adapter, answers the held-out prompts (or the first SFT training
prompts) ``--samples`` times each at ``--temperature`` with ``transformers``' ``generate``, and prints, overall
and per family: exact match, the share of sentences, and the share of sentences the gold judge ranks top (right
answer, faithful restatement).

    python bench/style_probe.py artifacts/sft/adapter                   # held-out prompts, 8 samples at 0.7
    python bench/style_probe.py artifacts/sft/adapter --split train --prompts 100 --show 20

With ``--reward_model`` it also scores the samples with an exported reward model and prints its pairwise accuracy
on the comparisons the policy's own samples make: for each prompt, every two distinct responses that the gold
judge ranks differently, as InstructGPT's labellers and Gao et al.'s gold model compare samples of the SFT policy.
These are the comparisons PPO's rollouts ask the reward model for; the reward-model stage's held-out accuracy is on
generated pairs (lit_ft.data.gold.gold_pair_records).

    python bench/style_probe.py artifacts/sft/adapter --reward_model artifacts/rm

It measured that the embedded base cannot copy a list of letters (docs/rlhf.md, "The letter families"), and that
the first design's near misses (neighbours swapped) were not the SFT policy's errors (docs/rlhf.md, fourth session).
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter, defaultdict
from collections.abc import Callable

import torch

from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.formats import format_alpaca_prompt
from lit_ft.data.gold import extract_answer, gold_rank, response_style
from lit_ft.data.preference_formats import tokenize_pair


def pairwise_tally(samples: dict[tuple[str, str], set[str]], score: Callable[[str, str], float]
                   ) -> dict[str, list[int]]:
    """[right, judged] per key ("all", task family, "2>1" / "2>0" / "1>0") over the pairs of distinct responses to
    one question that the gold judge ranks differently; ``samples`` maps (task, question) to responses, ``score``
    (question, response) to a reward. A tie counts as wrong."""
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (task, question), responses in samples.items():
        for first, second in itertools.combinations(sorted(responses), 2):
            ranks = gold_rank(question, first), gold_rank(question, second)
            if ranks[0] == ranks[1]:
                continue
            better, worse = (first, second) if ranks[0] > ranks[1] else (second, first)
            right = score(question, better) > score(question, worse)
            for key in ("all", task, f"{max(ranks)}>{min(ranks)}"):
                tally[key][0] += right
                tally[key][1] += 1
    return dict(tally)


def reward_model_scores(base: str, reward_model: str, tokenizer) -> Callable[[str, str], float]:
    """(question, response) -> the exported reward model's score, rendered and tokenized as its stage's pairs."""
    from transformers import AutoModelForCausalLM

    from lit_ft.stages.reward_model import load_reward_model

    scorer = load_reward_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), reward_model).eval()

    def score(question: str, response: str) -> float:
        pair = tokenize_pair({"instruction": question, "input": "", "chosen": response, "rejected": response},
                             tokenizer)
        ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
        with torch.no_grad():
            return float(scorer(ids, torch.ones_like(ids)))

    return score


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="a PEFT adapter trained on the embedded base")
    parser.add_argument("--base", default="artifacts/base/tiny-mistral")
    parser.add_argument("--split", choices=["heldout", "train"], default="heldout")
    parser.add_argument("--prompts", type=int, default=200, help="how many prompts of the split")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (GRPO's G)")
    parser.add_argument("--temperature", type=float, default=0.7, help="the RL stages' sampling temperature")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--batch", type=int, default=25, help="prompts per generate call")
    parser.add_argument("--show", type=int, default=0, help="print this many sampled sentences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reward_model", default=None, help="an exported reward model (artifacts/rm) to score the "
                        "pairs of samples the gold judge ranks differently")
    args = parser.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lit_ft.backbone.builder import load_tokenizer

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32),
                                      args.adapter).eval()
    train, heldout = EmbeddedWorld().facts()
    facts = (heldout if args.split == "heldout" else train)[: args.prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    counts: dict[str, Counter] = defaultdict(Counter)
    sampled: dict[tuple[str, str], set[str]] = defaultdict(set)
    shown = 0
    for start in range(0, len(facts), args.batch):
        chunk = facts[start : start + args.batch]
        texts = [format_alpaca_prompt(f.question) for f in chunk]
        ids = [tokenizer(t)["input_ids"] for t in texts]
        width = max(map(len, ids))
        query = torch.tensor([[pad] * (width - len(i)) + i for i in ids]).repeat_interleave(args.samples, 0)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]).repeat_interleave(args.samples, 0)
        with torch.no_grad():
            out = model.generate(input_ids=query, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                 top_p=1.0, max_new_tokens=args.max_new_tokens, pad_token_id=pad)
        for row, tokens in enumerate(out):
            fact, prompt = chunk[row // args.samples], texts[row // args.samples]
            response = tokenizer.decode(tokens[width:], skip_special_tokens=True)
            sampled[fact.task, fact.question].add(response.strip())
            sentence = response_style(response) == "sentence"
            top = gold_rank(prompt, response) == 2
            for key in ("all", fact.task):
                c = counts[key]
                c["n"] += 1
                c["right"] += extract_answer(response) == fact.answer
                c["sentence"] += sentence
                c["top"] += top
            if sentence and shown < args.show:
                shown += 1
                print(f"{fact.question!r} -> {response.strip()!r} (gold rank {gold_rank(prompt, response)})")
    print(f"{args.split}, {len(facts)} prompts x {args.samples} samples at temperature {args.temperature}:")
    print(f"{'family':<10} {'samples':>7} {'exact match':>11} {'sentences':>9} {'top-ranked sentences':>20}")
    for key in ["all", *sorted(k for k in counts if k != "all")]:
        c = counts[key]
        faithful = f"{c['top'] / c['sentence']:.1%}" if c["sentence"] else "-"
        print(f"{key:<10} {c['n']:>7} {c['right'] / c['n']:>11.1%} {c['sentence'] / c['n']:>9.1%} {faithful:>20}")
    if args.reward_model:
        del model
        tally = pairwise_tally(sampled, reward_model_scores(args.base, args.reward_model, tokenizer))
        print(f"reward model {args.reward_model}: pairwise accuracy on the samples' pairs the gold judge ranks "
              "differently (2 > 1: style; 2 > 0 and 1 > 0: correctness)")
        for key in ["all", *sorted(k for k in tally if k != "all")]:
            right, judged = tally[key]
            print(f"{key:<10} {right:>5}/{judged:<5} {right / judged:.1%}")


if __name__ == "__main__":
    main()
