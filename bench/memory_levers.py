"""The memory levers of docs/memory.md, each measured with ``lit-ft estimate``'s model of the real code path.

    python bench/memory_levers.py            # a markdown table, ~20 s (no weights, no GPU)

The 7B SFT recipe (configs/mistral7b_qlora_alpaca.yaml: NF4, LoRA r=16 on all linears with dropout 0.05, packed
rows of 2048, gradient checkpointing, bf16 autocast, paged AdamW) at micro-batch 2 and 4, and the same recipe on
Llama-3-8B's shape (a 128k vocabulary: the shape of torchtune's published 7.4 GiB QLoRA figure), from lit_ft's
previous path (PEFT's ``prepare_model_for_kbit_training``, 4096-row loss chunks) to the current one, one lever at a
time; then options the recipe does not take. Every figure is the estimate's peak allocated (the larger of the
forward pass's end and the backward pass, over what lives throughout), with the two phases beside it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPE = ROOT / "configs" / "mistral7b_qlora_alpaca.yaml"
STEPS = [  # (lever, the settings after it): cumulative
    ("lit_ft before: PEFT's preparation (fp32 embeddings, norms, head; so an fp32 stream), 4096-row loss chunks",
     {"kbit_preparation": "peft", "loss_chunk_size": 4096}),
    ("+ lean 4-bit preparation (non-quantised weights, stream and checkpointed inputs in bf16)",
     {"kbit_preparation": "lean", "loss_chunk_size": 4096}),
    ("+ 1024-row loss chunks (lit_ft now)", {"kbit_preparation": "lean", "loss_chunk_size": 1024}),
]
OPTIONS = [  # on top of lit_ft now; not taken by the recipe
    ("option: LoRA dropout 0 (the recipe keeps the QLoRA paper's 0.05)", {"lora_dropout": 0.0}),
    ("option: attn_implementation lit_ft_packed (no mask, no repeated KV heads)",
     {"attn_implementation": "lit_ft_packed"}),
]
COLUMNS = [("Mistral-7B 2048 x 2", None, 2), ("Mistral-7B 2048 x 4", None, 4),
           ("Llama-3-8B 2048 x 2", "meta-llama/Meta-Llama-3-8B", 2)]


def cell(model: str | None, batch: int, overrides: dict) -> str:
    from lit_ft.tools.estimate import hf_config, parse_config, setup_from_config
    from lit_ft.tools.memory_model import GIB, ModelShape, estimate, meta_model

    args = ["--config", str(RECIPE), f"--data.init_args.micro_batch_size={batch}"]
    if model:
        args.append(f"--model.init_args.backbone.pretrained={model}")
    setup, backbone = setup_from_config(parse_config(args))
    config, source = hf_config(backbone.get("pretrained"))
    est = estimate(ModelShape.from_hf(config, source), replace(setup, **overrides), _model(config, meta_model))
    return (f"**{est.allocated / GIB:.2f}** ({est.phase_bytes('forward') / GIB:.2f} / "
            f"{est.phase_bytes('backward') / GIB:.2f})")


_MODELS: dict[int, object] = {}


def _model(config, meta_model):
    """One meta model per shape (building one takes seconds)."""
    return _MODELS.setdefault(config.vocab_size, meta_model(config))


def main() -> str:
    header = "| step | " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, overrides in STEPS + [(n, {**STEPS[-1][1], **o}) for n, o in OPTIONS]:
        lines.append(f"| {name} | " + " | ".join(cell(m, b, overrides) for _, m, b in COLUMNS) + " |")
    table = "\n".join(lines)
    print("peak allocated GiB (forward end / backward phase), lit-ft estimate's model:\n" + table)
    return table


if __name__ == "__main__":
    main()
