"""Training quality of lit_ft's lean 4-bit preparation against PEFT's: the first 100 steps' loss, 3 seeds each.

    python bench/lean_preparation_quality.py                  # 3 seeds x 2 paths x 100 steps, ~15 min on one core
    python bench/lean_preparation_quality.py --steps 5 --seeds 1   # a smoke run

A tiny stand-in of the 7B SFT recipe (configs/mistral7b_qlora_alpaca.yaml) trained on CPU in bf16: a randomly
initialised Mistral-architecture base (hidden 64, 2 layers, GQA, a 512-token vocabulary: CPU bf16 matmuls are too
slow for the 32k one) saved in Hub format and loaded through ``from_pretrained`` with NF4 + double quantisation and
bf16 compute, LoRA r=16 on every linear with dropout 0.05, gradient checkpointing, packed rows of 256 with masked
prompts, bf16-mixed autocast, lit_ft's CausalLM step. The text comes from a fixed sparse Markov chain (each token
has 4 likely successors), so the loss falls from ln(512) = 6.2 towards ln(4) as the adapter learns it.

The two paths differ only in how the 4-bit base is prepared:

* ``peft`` (lit_ft's path before docs/memory.md): ``peft.prepare_model_for_kbit_training`` up-casts embeddings,
  norms and head to fp32, so the residual stream and the loss's head run in fp32 (4096-row loss chunks);
* ``lean`` (lit_ft.backbone.build_model): the base frozen, non-quantised weights kept in bf16 (1024-row chunks).

With the same seed both start from the same weights and see the same batches and dropout masks, so the gap
between their loss curves is the numerical effect of the preparation. The verdict compares the mean gap per step
(same seed, lean - peft) with the seed spread of each path (max - min over seeds, per step, averaged over steps).
The last line is ``quality: mean |lean - peft| = X, seed spread (peft) = Y, (lean) = Z: within spread`` or
``... OUTSIDE spread``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


VOCAB = 512
SHAPE = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}


class Tokens:
    """What build_model needs of a tokenizer: the special ids and the vocabulary size."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return VOCAB


def save_base(directory: Path) -> str:
    """A randomly initialised Mistral of :data:`SHAPE` saved in Hub format (bf16), as a hub checkpoint would be."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                           max_position_embeddings=512, **SHAPE)
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(directory / "base")
    return str(directory / "base")


def markov_rows(rows: int, length: int, seed: int) -> list[dict]:
    """Packed rows of examples (16..96 tokens, the first 40% a masked prompt) from a fixed sparse Markov chain."""
    import torch

    table = torch.randint(3, VOCAB, (VOCAB, 4), generator=torch.Generator().manual_seed(1234))  # the same text
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        ids, labels, positions = [], [], []
        while len(ids) < length:
            n = min(int(torch.randint(16, 97, (1,), generator=g)), length - len(ids))
            token = int(torch.randint(3, VOCAB, (1,), generator=g))
            example = []
            for _ in range(n):
                example.append(token)
                token = int(table[token, int(torch.randint(0, 4, (1,), generator=g))])
            ids += example
            labels += [-100] * int(0.4 * n) + example[int(0.4 * n):]
            positions += list(range(n))
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                    "position_ids": torch.tensor(positions)})
    return out


def spec(base: str):
    """The recipe's backbone on the stand-in base."""
    from lit_ft.backbone import Backbone, LoraSettings

    return Backbone(pretrained=base, quantization="nf4", dtype="bfloat16", compute_dtype="bfloat16",
                    attn_implementation="sdpa", gradient_checkpointing=True,
                    lora=LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear", adapter_name="sft"))


def peft_prepared(base: str):
    """The model as lit_ft built it before the lean preparation (PEFT's preparation, then the same adapter)."""
    from peft import prepare_model_for_kbit_training

    from lit_ft.backbone import add_adapter
    from lit_ft.backbone.builder import _pretrained_model

    backbone = spec(base)
    model = _pretrained_model(backbone)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return add_adapter(model, backbone.lora)


def run(path: str, seed: int, steps: int, base: str) -> list[float]:
    """Train ``steps`` optimizer steps; the training loss of each."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lit_ft.data.packing import PackedCollator
    from lit_ft.stages.causal_lm import CausalLM

    L.seed_everything(seed, verbose=False)
    module = CausalLM(backbone=spec(base), optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0),
                      loss_chunk_size=4096 if path == "peft" else 1024)
    module._tokenizer = Tokens()
    if path == "peft":
        module.model = peft_prepared(base).train()  # configure_model keeps a model that is already there
    else:
        module.configure_model()
    loader = DataLoader(markov_rows(4 * steps, 256, seed), batch_size=4, collate_fn=PackedCollator(pad_token_id=0))
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0, callbacks=[Record()])
    trainer.fit(module, train_dataloaders=loader)
    return losses


def spread(curves: list[list[float]]) -> float:
    """Max - min over seeds at each step, averaged over steps."""
    return statistics.fmean(max(step) - min(step) for step in zip(*curves))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (100: the issue's)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per path (3: the issue's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the curves and the verdict here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is much faster on a busy shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    curves: dict[str, list[list[float]]] = {"peft": [], "lean": []}
    with tempfile.TemporaryDirectory(prefix="lean_quality_") as tmp:
        base = save_base(Path(tmp))
        for seed in range(args.seeds):
            for path in ("peft", "lean"):
                start = time.perf_counter()
                curves[path].append(run(path, seed, args.steps, base))
                losses = curves[path][-1]
                print(f"{path} seed {seed}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, mean of the last 10 steps "
                      f"{statistics.fmean(losses[-10:]):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    gap = statistics.fmean(abs(a - b) for lean, peft in zip(curves["lean"], curves["peft"])
                           for a, b in zip(lean, peft))
    signed = statistics.fmean(a - b for lean, peft in zip(curves["lean"], curves["peft"]) for a, b in zip(lean, peft))
    spreads = {p: spread(c) if len(c) > 1 else float("nan") for p, c in curves.items()}
    within = gap < min(spreads.values())
    for path in ("peft", "lean"):
        means = [statistics.fmean(step) for step in zip(*curves[path])]
        marks = [0, 9, 24, 49, 74, len(means) - 1]
        print(f"{path:5s} mean loss at steps " + ", ".join(f"{i + 1}: {means[i]:.3f}" for i in marks if i < len(means)))
    verdict = "within spread" if within else "OUTSIDE spread"
    print(f"quality: mean |lean - peft| = {gap:.4f} (signed {signed:+.4f}), seed spread (peft) = {spreads['peft']:.4f}, "
          f"(lean) = {spreads['lean']:.4f}: {verdict}")
    result = {"curves": curves, "gap": gap, "signed_gap": signed, "spread": spreads, "within": within}
    if args.json:
        args.json.write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
