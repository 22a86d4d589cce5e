"""Benchmark: the rollout sampler before and after each change, in one process, on the embedded-size model.

The old sampler is read from git (``--baseline``, default the commit before the changes) and run beside today's
``lit_ft.rl.rollout.sample`` in its steps:

* ``old``: DynamicCache, ``torch.multinomial`` per token (the CPU generator's draw goes through ``.cpu()``), a
  ``finished.all()`` check per token, every prompt given G times;
* ``draw``: + inverse-CDF draws from uniforms drawn once per call, outputs written into preallocated tensors;
* ``preallocated``: + the KV cache allocated once (lit_ft.rl.kv_cache.PreallocatedLayer), no concatenation;
* ``shared``: + each prompt prefilled once, its cache repeated G times (``num_samples=G``): today's default;
* ``shared-static`` / ``shared-dynamic``: ``shared`` with transformers' StaticCache / DynamicCache instead.

The model is the embedded TinyConfig (hidden 128, 4 layers, 32k vocabulary) with random weights (speed does not
depend on them; such a model almost never samples EOS, so every row runs all ``--new-tokens`` steps); the prompts
are the embedded tasks' first ``--batch`` training prompts. Variants run in turn, in a rotating order, ``--repeats``
times; the machine is shared, so the figures are medians and ratios to ``old`` measured in the same run.

    python bench/sampler.py [--batch 64] [--group 8] [--new-tokens 16] [--repeats 5]

The last line is ``bench-sampler: old/shared time ratio = X.XX``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# 6dea0a6: main before the sampler changes (issue 19's restructure; lit_ft/rl/rollout.py as PPO first used it).
BASELINE = "6dea0a6"


def baseline_sampler(revision: str):
    """``sample`` as it was at ``revision``: the file from git, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:lit_ft/rl/rollout.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_rollout.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_rollout", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.sample


def tokenizer():
    """The Mistral-7B-v0.1 tokenizer shipped in mistral_common (as the tests build it), pad = unk."""
    import mistral_common
    from transformers import AutoTokenizer

    directory = Path(tempfile.mkdtemp())
    shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
                directory / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.pad_token = tok.unk_token
    return tok


def prompts(tok, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    from lit_ft.data.prompts import record_prompt
    from lit_ft.data.synthetic import instruction_records, split_facts
    from lit_ft.padding import pad_rows

    train, _ = split_facts()
    rows = [record_prompt(r, tok).input_ids for r in instruction_records(train[:count])]
    return pad_rows(rows, tok.pad_token_id, "left")


def model(vocab_size: int):
    from transformers import MistralConfig, MistralForCausalLM

    from lit_ft.backbone.builder import TinyConfig

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=vocab_size, tie_word_embeddings=False, **asdict(TinyConfig()))
    config._attn_implementation = "sdpa"
    return MistralForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="prompts per call (64: PPO's rollout batch)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt, G (8: a common GRPO group)")
    parser.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens (16: configs/ppo.yaml)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0.7: configs/ppo.yaml")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old sampler")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's; 1 is steadier on a shared, loaded machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from lit_ft.rl.rollout import sample

    old = baseline_sampler(args.baseline)
    tok = tokenizer()
    net = model(len(tok))
    ids, mask = prompts(tok, args.batch)
    G = args.group
    ids_g, mask_g = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    common = (args.new_tokens, tok.eos_token_id, tok.pad_token_id, args.temperature, 1.0)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    variants = {
        "old": lambda: old(net, ids_g, mask_g, *common, seeded()),
        "draw": lambda: sample(net, ids_g, mask_g, *common, seeded(), cache="dynamic"),
        "preallocated": lambda: sample(net, ids_g, mask_g, *common, seeded(), cache="preallocated"),
        "shared": lambda: sample(net, ids, mask, *common, seeded(), num_samples=G, cache="preallocated"),
        "shared-static": lambda: sample(net, ids, mask, *common, seeded(), num_samples=G, cache="static"),
        "shared-dynamic": lambda: sample(net, ids, mask, *common, seeded(), num_samples=G, cache="dynamic"),
    }
    steps = ("old", "draw", "preallocated", "shared")  # one change each
    print(f"model: embedded TinyConfig, random weights, vocab {len(tok)}; {args.batch} prompts x G={G} = "
          f"{args.batch * G} rows, prompt width {ids.shape[1]}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads", flush=True)

    # Same answers first: greedy tokens of every variant against the old sampler; sampled tokens of the shared
    # prefill against the same prompts given G times (same seed, same draws).
    greedy_old = old(net, ids_g, mask_g, args.new_tokens, tok.eos_token_id, tok.pad_token_id, greedy=True)
    greedy_new = sample(net, ids, mask, args.new_tokens, tok.eos_token_id, tok.pad_token_id, greedy=True,
                        num_samples=G)
    print(f"greedy tokens old == shared: {torch.equal(greedy_old.tokens, greedy_new.tokens)}")
    outputs = {name: variants[name]() for name in ("preallocated", "shared")}  # also the warm-up
    print(f"sampled tokens shared == preallocated (prompts given G times): "
          f"{torch.equal(outputs['shared'].tokens, outputs['preallocated'].tokens)}", flush=True)
    for name in ("old", "draw", "shared-static", "shared-dynamic"):
        variants[name]()  # warm-up

    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names),
              flush=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    tokens = args.batch * G * args.new_tokens
    print(f"\n{'variant':<16}{'median s':>10}{'tokens/s':>10}{'old/variant':>13}{'previous/variant':>18}")
    for name in names:
        step = steps.index(name) if name in steps else 0
        previous = f"{medians[steps[step - 1]] / medians[name]:.2f}" if step else ""
        print(f"{name:<16}{medians[name]:>10.2f}{tokens / medians[name]:>10.0f}"
              f"{medians['old'] / medians[name]:>13.2f}{previous:>18}")
    print(f"bench-sampler: old/shared time ratio = {medians['old'] / medians['shared']:.2f}")


if __name__ == "__main__":
    main()
