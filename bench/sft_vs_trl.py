"""Benchmark: lit_ft SFT against TRL's SFTTrainer (with PEFT) on the same weights, data, LoRA and schedule.

Both sides train LoRA r=16 on every linear layer of the same randomly initialised Mistral-architecture model
(speed does not depend on the weights), on the same Alpaca records with the standard template, packed, with the
loss on completions only, a constant learning rate without warm-up, the same seed, micro-batch, sequence
length and number of optimizer steps. Each side runs in its own subprocess, so that its peak RSS (or peak CUDA
memory) is its own, and prints one JSON line. The first optimizer step is a warm-up and is not timed.

    python bench/sft_vs_trl.py                 # CPU: hidden 256, 4 layers, 600 examples, rows of 512
    python bench/sft_vs_trl.py --gpu           # CUDA: Mistral-7B-v0.1 shape, nf4, rows of 2048, checkpointing
    python bench/sft_vs_trl.py --gpu --data records.json --model-dir runs/gpu_check/model   # as make gpu-check

The default on a machine with CUDA is ``--gpu``. The last line is
``bench: lit_ft/trl real-token throughput ratio = X.XX, peak memory ratio = Y.YY``.
Skips (exit 0) with a reason when the Alpaca records (``--data``, default ../shared/data/alpaca_5000.json) or trl
are missing. This process never touches the GPU: the model is built (or ``--model-dir`` reused) and each side runs
in a child process, so that a side's peak memory is its own and the parent holds none of the device's memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"
H100_BF16_DENSE_TFLOPS = 989.0  # H100/H200 SXM bf16 dense peak: the MFU denominator unless --peak-tflops says


@dataclass
class Shape:
    """The model both sides train: Mistral architecture, real 32k Mistral tokenizer, random weights."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


CPU_SHAPE = Shape(256, 688, 4, 8, 2)  # the tiny model; 688: 2.7x the width, as lit_ft's TinyConfig
MISTRAL_7B = Shape(4096, 14336, 32, 32, 8)  # Mistral-7B-v0.1


@dataclass
class Setup:
    """Everything both sides share (passed to each child as JSON)."""

    model_dir: str
    gpu: bool
    steps: int
    examples: int
    seq: int
    micro_batch: int
    lr: float
    seed: int
    attn: str  # lit_ft's attention implementation (TRL keeps sdpa)
    lit_loss: str  # "supervised" (lit_ft's) or "full" (full logits: the path being replaced, for ablation)
    data: str = str(ALPACA)  # the Alpaca records (a JSON list)


# ----------------------------------------------------------------------------------------------- shared
def alpaca_records(path: str, n: int) -> list[dict]:
    """The first ``n`` Alpaca records with a non-empty output (lit_ft skips empty responses; so does TRL's side)."""
    records = json.loads(Path(path).read_text())[:n]
    return [r for r in records if r.get("output", "").strip()]


def current_memory_mib(gpu: bool) -> float:
    """Memory in use now: CUDA memory allocated on a GPU, else this process's resident set size."""
    import torch

    if gpu:
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mib(gpu: bool) -> float:
    """Peak CUDA memory allocated on a GPU, else this process's peak resident set size (ru_maxrss is in KiB)."""
    import torch

    if gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """Wall time and token counts of every optimizer step after the first (the warm-up)."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.start: float | None = None
        self.cpu_start = 0.0
        self.cpu_seconds = 0.0  # process CPU time (all threads): steadier than wall time on a shared machine
        self.steps = 0
        self.real = self.supervised = 0
        self.pending_real = self.pending_supervised = 0
        self.losses: list[float] = []
        self.elapsed = 0.0
        self.setup_mib: float | None = None  # memory in use when the first batch arrives (model, data, imports)

    def count(self, real: int, supervised: int) -> None:
        """Tokens of a micro-batch about to be trained on."""
        if self.setup_mib is None:
            self.setup_mib = current_memory_mib(self.gpu)
        self.pending_real += real
        self.pending_supervised += supervised

    def step_done(self, loss: float) -> None:
        """An optimizer step finished: start the clock after the first, count the tokens of the later ones."""
        if self.gpu:
            import torch

            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.process_time()
        self.steps += 1
        self.losses.append(round(loss, 4))
        if self.start is None:
            self.start, self.cpu_start = now, cpu
        else:
            self.real += self.pending_real
            self.supervised += self.pending_supervised
            self.elapsed, self.cpu_seconds = now - self.start, cpu - self.cpu_start
        self.pending_real = self.pending_supervised = 0

    def result(self, setup: Setup, extra: dict) -> dict:
        real_tok_s = self.real / max(self.elapsed, 1e-9)
        out = {"real_tok_s": real_tok_s, "sup_tok_s": self.supervised / max(self.elapsed, 1e-9),
               "timed_steps": self.steps - 1, "seconds": self.elapsed, "losses": self.losses,
               "real_tokens": self.real, "supervised_tokens": self.supervised, "cpu_seconds": self.cpu_seconds,
               "peak_mib": peak_memory_mib(setup.gpu), "setup_mib": self.setup_mib, **extra}
        if setup.gpu:
            import torch

            # 6 N FLOPs per token (forward 2N + backward 4N), the usual MFU convention even though a frozen base
            # skips its weight gradients; checkpointing's recompute is not counted.
            peak = float(os.environ.get("BENCH_PEAK_TFLOPS", H100_BF16_DENSE_TFLOPS)) * 1e12
            out["mfu"] = 6 * matmul_params(setup.model_dir) * real_tok_s / peak
            out["device"] = torch.cuda.get_device_name()
        return out


def make_model_dir(shape: Shape, gpu: bool, directory: Path) -> None:
    """Save a seeded random Mistral-architecture model and the embedded Mistral-7B-v0.1 tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from lit_ft.backbone import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = MistralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=10000.0,
                           **asdict(shape))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if gpu else torch.float32)  # 7B: build in bf16, never in fp32
    try:
        with torch.device("cuda" if gpu else "cpu"):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def matmul_params(model_dir: str) -> int:
    """For MFU: every weight a token's FLOPs go through (the input embedding is a lookup, not a matmul), from the
    saved config (meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


# ----------------------------------------------------------------------------------------------- lit_ft
def run_lit_ft(setup: Setup) -> dict:
    """lit_ft's own path: CausalLM + InstructionDataModule under a Lightning Trainer."""
    import lightning as L
    import torch

    from lit_ft.backbone import Backbone, LoraSettings
    from lit_ft.data.instruction import InstructionDataModule
    from lit_ft.losses.lm import IGNORE_INDEX, full_logits_token_loss
    from lit_ft.stages.causal_lm import CausalLM

    L.seed_everything(setup.seed, verbose=False)
    backbone = Backbone(
        pretrained=setup.model_dir, attn_implementation=setup.attn,
        quantization="nf4" if setup.gpu else "none", dtype="bfloat16" if setup.gpu else "float32",
        compute_dtype="bfloat16" if setup.gpu else "float32", gradient_checkpointing=setup.gpu,
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
    )
    module = CausalLM(
        backbone=backbone, optimizer=lambda p: torch.optim.AdamW(p, lr=setup.lr, weight_decay=0.0),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
    )
    if setup.lit_loss == "full":  # the replaced path: logits at every position, then the same summed loss
        def full_token_loss(batch: dict) -> tuple:
            out = module.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                               attention_mask=batch.get("attention_mask"), use_cache=False)
            return full_logits_token_loss(out.logits, batch["labels"])
        module.token_loss = full_token_loss
    data = InstructionDataModule(
        source=setup.data, format="alpaca", max_seq_length=setup.seq, packing=True,
        micro_batch_size=setup.micro_batch, max_examples=setup.examples, val_split_fraction=0.0,
        seed=setup.seed,
    )
    data.connect(module.tokenizer)
    clock = StepClock(setup.gpu)
    pad_id = module.tokenizer.pad_token_id

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            clock.count(int((batch["input_ids"] != pad_id).sum()),  # packed: only the tail pads
                         int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.step_done(float(trainer.callback_metrics["train/loss"]))

    trainer = L.Trainer(
        max_steps=setup.steps, accelerator="gpu" if setup.gpu else "cpu", devices=1,
        precision="bf16-mixed" if setup.gpu else "32-true", gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, callbacks=[Timer()],
    )
    trainer.fit(module, datamodule=data)
    stats = data.stats_train
    return clock.result(setup, {"packing_efficiency": stats.packing_efficiency,
                                        "examples": stats.examples, "tokens": stats.tokens})


# ----------------------------------------------------------------------------------------------- TRL
def run_trl(setup: Setup) -> dict:
    """TRL's SFTTrainer with a PEFT LoRA config, prompt-completion records, completion-only loss, bfd packing."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lit_ft.data.formats import format_alpaca_prompt

    records = alpaca_records(setup.data, setup.examples)
    dataset = Dataset.from_list([
        {"prompt": format_alpaca_prompt(r["instruction"], r.get("input", "")), "completion": r["output"]}
        for r in records
    ])
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    kwargs: dict = {"attn_implementation": "sdpa", "dtype": torch.bfloat16 if setup.gpu else torch.float32}
    if setup.gpu:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    torch.manual_seed(setup.seed)
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, **kwargs)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), max_steps=setup.steps,
        per_device_train_batch_size=setup.micro_batch, gradient_accumulation_steps=1,
        learning_rate=setup.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", seed=setup.seed, data_seed=setup.seed,
        packing=True, packing_strategy="bfd", max_length=setup.seq, completion_only_loss=True,
        gradient_checkpointing=setup.gpu, bf16=setup.gpu, fp16=False, use_cpu=not setup.gpu,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                             task_type="CAUSAL_LM")
    clock = StepClock(setup.gpu)

    class Timer(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "loss" in logs:
                clock.step_done(float(logs["loss"]))

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting_collator(features: list) -> dict:
        batch = collate(features)
        # Padding-free: every position is a real token (TRL flattens the micro-batch into one row).
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        clock.count(real, int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    trainer.data_collator = counting_collator
    packed = trainer.train_dataset
    tokens = sum(len(ids) for ids in packed["input_ids"])
    trainer.train()
    return clock.result(setup, {"packing_efficiency": tokens / (len(packed) * setup.seq),
                                        "examples": len(records), "tokens": tokens})


# ----------------------------------------------------------------------------------------------- driver
def child(side: str, setup: Setup) -> dict:
    """Run one side in a fresh interpreter and read its JSON line."""
    cmd = [sys.executable, __file__, "--child", side, "--setup", json.dumps(asdict(setup))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)  # failures reported below
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"bench: the {side} run failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def combine(runs: list[dict]) -> dict:
    """Several rounds of one side as one: tokens over seconds summed across rounds, the highest peak memory."""
    out = dict(runs[0])
    seconds = sum(r["seconds"] for r in runs)
    out["seconds"] = seconds
    out["timed_steps"] = sum(r["timed_steps"] for r in runs)
    out["cpu_seconds"] = sum(r["cpu_seconds"] for r in runs)
    out["real_tokens"] = sum(r["real_tokens"] for r in runs)
    out["real_tok_s"] = sum(r["real_tokens"] for r in runs) / seconds
    out["sup_tok_s"] = sum(r["supervised_tokens"] for r in runs) / seconds
    out["peak_mib"] = max(r["peak_mib"] for r in runs)
    if "mfu" in out:
        out["mfu"] = runs[0]["mfu"] * out["real_tok_s"] / runs[0]["real_tok_s"]
    return out


def report(name: str, r: dict, gpu: bool) -> None:
    memory = "peak CUDA" if gpu else "peak RSS"
    mfu = f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""
    print(f"{name:8s} real {r['real_tok_s']:8.0f} tok/s  supervised {r['sup_tok_s']:8.0f} tok/s  "
          f"{memory} {r['peak_mib']:7.0f} MiB (at start {r['setup_mib']:.0f})  "
          f"packing efficiency {r['packing_efficiency']:.1%}{mfu}  ({r['timed_steps']} timed steps, "
          f"{r['seconds']:.1f} s, {r['real_tokens'] / max(r['cpu_seconds'], 1e-9):.0f} real tok per CPU-s; "
          f"{r['examples']} examples, {r['tokens']:,} tokens)", flush=True)
    print(f"{'':8s} loss by step {r['losses']}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="Mistral-7B-shaped nf4 run on CUDA (default with CUDA)")
    mode.add_argument("--cpu", action="store_true", help="the tiny CPU run even where CUDA is present")
    parser.add_argument("--steps", type=int, help="optimizer steps, the first untimed (12 on CPU, 8 on GPU)")
    parser.add_argument("--examples", type=int, help="Alpaca records used (600 on CPU, 5000 on GPU)")
    parser.add_argument("--seq", type=int, help="packed row length (512 on CPU, 2048 on GPU)")
    parser.add_argument("--micro-batch", type=int, default=4)  # 4: the (and the 7B recipe's) micro-batch
    parser.add_argument("--lr", type=float, default=2e-4)  # 2e-4: QLoRA's 7B setting, constant on both sides
    parser.add_argument("--seed", type=int, default=42)  # 42: the configs' seed_everything
    parser.add_argument("--attn", default="lit_ft_packed",
                        help="lit_ft attention implementation (sdpa: transformers' packed mask, for ablation)")
    parser.add_argument("--lit-loss", choices=["supervised", "full"], default="supervised",
                        help="full: logits at every position (the path supervised-only replaces), for ablation")
    parser.add_argument("--sides", default="lit_ft,trl", help="which sides to run, comma-separated")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the sides alternately this many times (on a shared, noisy machine)")
    parser.add_argument("--data", default=str(ALPACA), help="Alpaca records, a JSON list (default: %(default)s)")
    parser.add_argument("--model-dir", help="a saved Mistral-architecture model of the mode's shape to reuse "
                                            "(default: a new random one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child == "build":  # the random model, in its own process (the parent never touches the GPU)
        make_model_dir(MISTRAL_7B if args.gpu else CPU_SHAPE, args.gpu, Path(args.setup))
        return
    if args.child:  # one side, in its own process
        setup = Setup(**json.loads(args.setup))
        result = run_lit_ft(setup) if args.child == "lit_ft" else run_trl(setup)
        print(json.dumps(result))
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not Path(args.data).exists():
        print(f"bench: skipped: {args.data} not found (--data; the shared data folder sits beside the checkout)")
        return
    if "trl" in sides and importlib.util.find_spec("trl") is None:
        print("bench: skipped: trl is not installed (pip install -e '.[bench]')")
        return
    import torch

    gpu = args.gpu or (torch.cuda.is_available() and not args.cpu)  # asks the driver: no CUDA context here
    if gpu and not torch.cuda.is_available():
        print("bench: skipped: --gpu needs CUDA")
        return
    shape = MISTRAL_7B if gpu else CPU_SHAPE
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        model_dir = args.model_dir or tmp
        if not args.model_dir:
            subprocess.run([sys.executable, __file__, "--child", "build", "--setup", model_dir,
                            "--gpu" if gpu else "--cpu"], check=True)
        setup = Setup(model_dir=model_dir, gpu=gpu, steps=args.steps or (8 if gpu else 12),
                      examples=args.examples or (5000 if gpu else 600), seq=args.seq or (2048 if gpu else 512),
                      micro_batch=args.micro_batch, lr=args.lr, seed=args.seed, attn=args.attn,
                      lit_loss=args.lit_loss, data=str(Path(args.data).resolve()))
        print(f"bench: {'GPU, Mistral-7B shape, nf4' if gpu else 'CPU, tiny Mistral'} "
              f"{asdict(shape) if not args.model_dir else args.model_dir}, "
              f"{setup.examples} Alpaca examples, rows of {setup.seq}, micro-batch {setup.micro_batch}, "
              f"LoRA r=16 all-linear, lr {setup.lr} constant, {setup.steps} steps; lit_ft attention {setup.attn}, "
              f"loss {setup.lit_loss}", flush=True)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for round_ in range(args.rounds):
            for side in sides:
                runs[side].append(child(side, setup))
                report(side if args.rounds == 1 else f"{side}#{round_ + 1}", runs[side][-1], gpu)
        results = {side: combine(r) for side, r in runs.items()}
        if args.rounds > 1:
            for side in sides:
                report(side, results[side], gpu)
    if {"lit_ft", "trl"} <= results.keys():
        ours, theirs = results["lit_ft"], results["trl"]
        if not gpu:  # CPU time is less disturbed by other work on the machine than wall time
            per_cpu = [r["real_tokens"] / max(r["cpu_seconds"], 1e-9) for r in (ours, theirs)]
            print(f"bench: lit_ft/trl real tokens per CPU-second ratio = {per_cpu[0] / per_cpu[1]:.2f}")
        print(f"bench: lit_ft/trl real-token throughput ratio = {ours['real_tok_s'] / theirs['real_tok_s']:.2f}, "
              f"peak memory ratio = {ours['peak_mib'] / theirs['peak_mib']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
