"""Measured peak memory beside lit-ft estimate, with tokens/s and MFU, on a Mistral-7B-v0.1-shaped QLoRA model.

    python bench/gpu_memory.py               # CUDA: 7B shape, random weights (no download), NF4 + double quant,
                                             # LoRA r=16 on all linear layers, gradient checkpointing, packed rows
                                             # of 2048, bf16 autocast, paged AdamW; ~3-5 min on one H100/H200
    python bench/gpu_memory.py --cpu         # the same code path with tiny shapes on CPU (auto without CUDA)

It runs lit_ft's own training step (lit_ft.stages.causal_lm.CausalLM: chunked supervised-only loss, per-token
normalisation) in a Lightning Trainer with the profiling callbacks, on synthetic packed rows (random tokens,
examples of 64..768 tokens, 40% of each example a masked prompt). The base weights are random bf16 tensors
quantised to NF4 layer by layer as bitsandbytes does when transformers loads a checkpoint with load_in_4bit, then
prepared by peft.prepare_model_for_kbit_training and given a LoRA adapter by lit_ft.backbone.add_adapter, as
lit_ft.backbone.build_model does.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def quantize_linears(model: torch.nn.Module, compute_dtype: torch.dtype, device: str) -> None:
    """Replace every decoder linear (not the head) by a bitsandbytes NF4 Linear4bit with double quantisation."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    for name in names:  # one layer at a time: each bf16 weight is freed once its NF4 copy exists
        parent, linear = model.get_submodule(name.rsplit(".", 1)[0]), model.get_submodule(name)
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              quant_storage=torch.uint8, device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to(torch.bfloat16), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
        q = q.to(device)  # quantises
        setattr(parent, name.rsplit(".", 1)[1], q)
        del linear, q
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps Linear4bit with its 4-bit LoRA


def build(cpu: bool):
    """The QLoRA model (random weights) and the Backbone spec describing it."""
    from peft import prepare_model_for_kbit_training
    from transformers import MistralConfig, MistralForCausalLM

    from lit_ft.backbone import Backbone, LoraSettings, add_adapter
    from lit_ft.tools.estimate import KNOWN_CONFIGS

    sizes = dict(TINY) if cpu else {k: v for k, v in KNOWN_CONFIGS["mistralai/Mistral-7B-v0.1"].items()
                                    if k != "model_type"}
    config = MistralConfig(**sizes, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    device = "cpu" if cpu else "cuda"
    compute = torch.float32 if cpu else torch.bfloat16
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = MistralForCausalLM(config)
    torch.set_default_dtype(previous)
    quantize_linears(model, compute, device)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear", adapter_name="sft")
    model = add_adapter(model, lora).train()
    if not cpu:
        torch.cuda.empty_cache()  # the bf16 weights are gone: do not count them as reserved
    # pretrained=None: the embedded Mistral-7B-v0.1 tokenizer (same vocabulary), no hub access
    spec = Backbone(pretrained=None, quantization="nf4",
                    dtype="bfloat16", compute_dtype="float32" if cpu else "bfloat16", attn_implementation="sdpa",
                    gradient_checkpointing=True, lora=lora)
    return model, spec


def packed_rows(num_rows: int, length: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Rows filled with random examples of 64..768 tokens (length/8..3*length/8 on short rows), prompt masked."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        parts, used = [], 0
        while used < length:
            n = min(rng.randint(max(2, length // 32), max(3, 3 * length // 8)), length - used)
            ids = torch.tensor([rng.randrange(3, vocab) for _ in range(n)])
            labels = ids.clone()
            labels[: int(0.4 * n)] = -100
            parts.append((ids, labels, torch.arange(n)))
            used += n
        rows.append({k: torch.cat([p[i] for p in parts]) for i, k in enumerate(("input_ids", "labels",
                                                                               "position_ids"))})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (default when there is no CUDA)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (8: 3 warm-up + 5 measured)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="rows per step (GPU 4, CPU 2)")
    parser.add_argument("--seq-length", type=int, default=None, help="packed row length (GPU 2048, CPU 256)")
    args = parser.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    batch = args.micro_batch_size or (2 if cpu else 4)
    length = args.seq_length or (256 if cpu else 2048)

    import lightning as L
    from torch.utils.data import DataLoader

    from lit_ft.callbacks.memory import MemoryMonitor
    from lit_ft.callbacks.throughput import ThroughputMonitor
    from lit_ft.data.packing import PackedCollator
    from lit_ft.stages.causal_lm import CausalLM
    from lit_ft.tools.estimate import GIB, ModelShape, TrainingSetup, estimate

    start = time.perf_counter()
    model, spec = build(cpu)
    built = time.perf_counter() - start
    opt_name = "AdamW" if cpu else "PagedAdamW"  # the recipe's paged AdamW needs CUDA

    def optimizer(params):
        if cpu:
            return torch.optim.AdamW(params, lr=2e-4)
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(params, lr=2e-4)
    module = CausalLM(backbone=spec, optimizer=optimizer)
    module.model = model  # configure_model keeps an existing model

    class PackedData(L.LightningDataModule):
        def __init__(self, max_seq_length: int, micro_batch_size: int, packing: bool = True):
            super().__init__()
            self.save_hyperparameters()  # read by the memory estimate, like InstructionDataModule's

        def train_dataloader(self) -> DataLoader:
            rows = packed_rows(batch * args.steps, length, model.config.vocab_size)
            return DataLoader(rows, batch_size=batch, collate_fn=PackedCollator(pad_token_id=0))

    shape = ModelShape.from_hf(model.get_base_model().config, "bench")
    setup = TrainingSetup(micro_batch_size=batch, seq_length=length, packing=True, quantization="nf4",
                          dtype_bytes=2, compute_bytes=4 if cpu else 2, gradient_checkpointing=True, lora_r=16,
                          lora_dropout=0.05, optimizer=opt_name, supervised_fraction=0.6)
    from lit_ft.tools.estimate import _config_from_shape, meta_model

    est = estimate(shape, setup, meta_model(_config_from_shape(shape)))
    throughput = ThroughputMonitor(log_every_n_steps=1, skip_first_steps=3)
    memory = MemoryMonitor(compare_after_batches=3, estimate=False)
    trainer = L.Trainer(accelerator="cpu" if cpu else "gpu", devices=1, precision="32-true" if cpu else "bf16-mixed",
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[throughput, memory])
    trainer.fit(module, PackedData(length, batch))
    summary = throughput.summary() or {}
    print(f"bench ({'CPU, tiny shapes' if cpu else torch.cuda.get_device_name()}): {batch} x {length} packed, "
          f"model built in {built:.0f} s")
    print(est.table())
    if not cpu:
        measured = memory.run_peak_allocated
        print(f"measured peak allocated {measured / GIB:.2f} GiB, reserved {memory.run_peak_reserved / GIB:.2f} GiB;"
              f" estimate {est.allocated / GIB:.2f} GiB allocated + {est.paged / GIB:.2f} GiB paged "
              f"(measured/estimate {measured / max(est.allocated, 1):.2f})")
    else:
        from lit_ft.callbacks.memory import peak_rss

        print(f"peak RSS {peak_rss() / GIB:.2f} GiB (CPU: runtime included); estimate {est.allocated / GIB:.3f} GiB")
    mfu = summary.get("mfu")
    print(f"tokens/s {summary.get('tokens_per_s', 0):,.0f} (supervised {summary.get('supervised_per_s', 0):,.0f}), "
          f"step {summary.get('step_s', 0):.2f} s, MFU {'n/a (no peak FLOP/s on CPU)' if mfu is None else f'{mfu:.1%}'}")


if __name__ == "__main__":
    main()
