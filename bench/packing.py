"""Benchmark: packed rows with supervised-only logits against padded batches with full logits, on real Alpaca.

Both run the same tiny Mistral-architecture model (the embedded TinyConfig, random weights: speed does not
depend on them), the same LoRA, micro-batch and number of optimizer steps, one after the other in one process.
Machines here are noisy, so the result is a ratio against the baseline measured in the same run.

    python bench/packing.py [--steps 12] [--examples 600]

Skips (exit 0) with a reason when ../shared/data/alpaca_5000.json is absent.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(packing: bool, supervised_only: bool, steps: int, examples: int, micro_batch: int, seq: int) -> dict:
    from lit_ft.backbone import Backbone, LoraSettings
    from lit_ft.data.instruction import InstructionDataModule
    from lit_ft.losses.lm import full_logits_token_loss
    from lit_ft.stages.causal_lm import CausalLM

    torch.manual_seed(0)
    module = CausalLM(backbone=Backbone(pretrained=None, lora=LoraSettings(r=16, alpha=32, dropout=0.0)))
    module.configure_model()
    data = InstructionDataModule(
        source=str(ALPACA), format="alpaca", max_seq_length=seq, packing=packing, micro_batch_size=micro_batch,
        max_examples=examples, val_split_fraction=0.0,
    )
    data.connect(module.tokenizer)
    data.setup("fit")
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=2e-4)
    module.train()
    real = supervised = 0
    losses = []
    batches = iter(data.train_dataloader())
    start = None
    for step in range(steps + 1):  # step 0 warms up and is not timed
        if step == 1:
            start = time.perf_counter()
            real = supervised = 0
        batch = next(batches)
        if supervised_only:
            loss_sum, n = module.token_loss(batch)
        else:
            out = module.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
            loss_sum, n = full_logits_token_loss(out.logits, batch["labels"])
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round((loss_sum / n).item(), 3))
        mask = batch.get("attention_mask")
        real += int(mask.sum()) if mask is not None else int((batch["input_ids"] != module.tokenizer.pad_token_id).sum())
        supervised += int(n)
    elapsed = time.perf_counter() - start
    return {
        "real_tok_s": real / elapsed,
        "sup_tok_s": supervised / elapsed,
        "packing_efficiency": data.stats_train.packing_efficiency,
        "peak_rss_mib": _peak_rss_mib(),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--one", choices=["padded", "packed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not ALPACA.exists():
        print(f"bench: skipped: {ALPACA} not found (the shared data folder sits beside the checkout)")
        return
    if args.one:  # a child process: one configuration, so that its peak RSS is its own
        packed = args.one == "packed"
        print(json.dumps(run(packed, packed, args.steps, args.examples, args.micro_batch, args.seq)))
        return
    common = ["--steps", str(args.steps), "--examples", str(args.examples), "--micro-batch", str(args.micro_batch),
              "--seq", str(args.seq)]

    def child(kind: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--one", kind, *common], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    # Baseline first: padded batches, logits for every position (what a plain HF forward does).
    base = child("padded")
    ours = child("packed")
    for name, r in (("padded + full logits", base), ("packed + supervised-only logits", ours)):
        print(f"{name:34s} real {r['real_tok_s']:7.0f} tok/s  supervised {r['sup_tok_s']:7.0f} tok/s  "
              f"packing efficiency {r['packing_efficiency']:.1%}  peak RSS {r['peak_rss_mib']:.0f} MiB")
        print(f"{'':34s} loss by step {r['losses']}")
    print(f"bench: packed/padded real-token throughput ratio = {ours['real_tok_s'] / base['real_tok_s']:.2f}, "
          f"peak memory ratio = {ours['peak_rss_mib'] / base['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
