"""Benchmark: lit_ft GRPO against TRL's GRPOTrainer on the same model, prompts, G, response length and steps.

Both sides train a fresh LoRA (r=16, all linear layers) on the same randomly initialised Mistral-architecture model
(speed does not depend on the weights), on the same embedded-world prompts (Alpaca template, BOS first), with
the same G samples per prompt, prompts per step, ``max_new_tokens``, temperature, exact-match reward, seed, a
constant learning rate, and one optimisation iteration per generation batch (mu = 1, one update per step), in
micro-batches of the same size (lit_ft's ``forward_batch_size``; TRL's ``per_device_train_batch_size``, with
``gradient_accumulation_steps`` = prompts x G / micro-batch, so one generation feeds one update), beta = 0 (no reference
model on either side: TRL's default), "dapo" loss normalisation (TRL's default), no vLLM (TRL generates with
``transformers``' ``generate``, its default path without vLLM), the same dtype. A step is one rollout batch:
sampling, scoring, and the update. The first step is a warm-up and is not timed.

Each side runs in its own subprocess, so that its peak RSS (or peak CUDA memory) is its own, and prints one JSON
line; the sides alternate ``--rounds`` times (a shared machine's load moves between runs).

    python bench/grpo_vs_trl.py                 # CPU: hidden 256, 4 layers; 8 prompts x G 8, 16 new tokens
    python bench/grpo_vs_trl.py --gpu           # CUDA: bf16, hidden 2048, 16 layers; 16 prompts x G 8, 128 tokens

The last line is ``bench-rl: lit_ft/trl samples-per-second ratio = X.XX, peak memory ratio = Y.YY``.
Skips (exit 0) with a reason when trl is missing.
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


@dataclass
class Shape:
    """The model both sides train: Mistral architecture, the real 32k Mistral tokenizer, random weights."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


CPU_SHAPE = Shape(256, 688, 4, 8, 2)  # bench/sft_vs_trl.py's tiny model
GPU_SHAPE = Shape(2048, 5632, 16, 16, 4)  # a ~1B model: generation-bound as real GRPO is, quick to build


@dataclass
class Setup:
    """Everything both sides share (passed to each child as JSON)."""

    model_dir: str
    gpu: bool
    steps: int
    prompts: int  # prompts per step
    group: int  # G, samples per prompt
    max_new_tokens: int
    temperature: float
    lr: float
    seed: int
    threads: int
    micro_batch: int = 16  # responses per forward/backward pass; gradients accumulate to one update per step


def peak_memory_mib(gpu: bool) -> float:
    """Peak CUDA memory allocated on a GPU, else this process's peak resident set size (ru_maxrss is in KiB)."""
    import torch

    if gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """Wall and CPU time of every step after the first, and the samples (responses) they made."""

    def __init__(self, gpu: bool, samples_per_step: int):
        self.gpu, self.samples_per_step = gpu, samples_per_step
        self.steps = 0
        self.seconds = self.cpu_seconds = 0.0
        self._start = self._cpu = 0.0

    def _sync(self) -> None:
        if self.gpu:
            import torch

            torch.cuda.synchronize()

    def begin(self) -> None:
        self._sync()
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def end(self) -> None:
        self._sync()
        self.steps += 1
        if self.steps > 1:  # the first step warms up (allocator, kernels): not timed
            self.seconds += time.perf_counter() - self._start
            self.cpu_seconds += time.process_time() - self._cpu

    def result(self, setup: Setup, extra: dict) -> dict:
        timed = max(self.steps - 1, 0)
        samples = timed * self.samples_per_step
        return {"timed_steps": timed, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "samples": samples,
                "samples_per_s": samples / max(self.seconds, 1e-9), "peak_mib": peak_memory_mib(setup.gpu), **extra}


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
    model = MistralForCausalLM(config).to(torch.bfloat16 if gpu else torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def embedded_prompts(setup: Setup, tokenizer):
    """The embedded world's training prompts, as the lit_ft side's data module renders them."""
    from lit_ft.data.embedded import EmbeddedWorld
    from lit_ft.data.prompts import PromptDataModule

    data = PromptDataModule(EmbeddedWorld(num_train=setup.prompts * setup.steps * 4, num_heldout=0),
                            micro_batch_size=setup.prompts, seed=setup.seed)
    data.connect(tokenizer)
    data.setup("fit")
    return data


# ----------------------------------------------------------------------------------------------- lit_ft
def run_lit_ft(setup: Setup) -> dict:
    """lit_ft's GRPO module under a Lightning Trainer."""
    import lightning as L
    import torch

    from lit_ft.backbone import Backbone, LoraSettings
    from lit_ft.rl.kl import KLLossSettings
    from lit_ft.rl.rewards import ExactMatchReward
    from lit_ft.rl.rollout import SamplingSettings
    from lit_ft.stages.grpo import GRPO, GRPOEvaluation, GRPOSettings

    L.seed_everything(setup.seed, verbose=False)
    dtype = "bfloat16" if setup.gpu else "float32"
    module = GRPO(
        backbone=Backbone(pretrained=setup.model_dir, dtype=dtype, compute_dtype=dtype,
                          lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear")),
        policy_adapter=None, rewards=[ExactMatchReward()],
        sampling=SamplingSettings(temperature=setup.temperature, max_new_tokens=setup.max_new_tokens),
        grpo=GRPOSettings(num_generations=setup.group, loss_type="dapo", num_iterations=1,
                          forward_batch_size=setup.micro_batch),
        kl=KLLossSettings(beta=0.0), evaluation=GRPOEvaluation(num_prompts=0, kl=False),
        optimizer=lambda p: torch.optim.AdamW(p, lr=setup.lr, weight_decay=0.0),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
    )
    data = embedded_prompts(setup, module.tokenizer)
    clock = StepClock(setup.gpu, setup.prompts * setup.group)
    lengths: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.end()
            lengths.append(float(trainer.callback_metrics["train/response_length"]))

    trainer = L.Trainer(
        max_steps=setup.steps, accelerator="gpu" if setup.gpu else "cpu", devices=1, precision="32-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, callbacks=[Timer()],
    )
    trainer.fit(module, datamodule=data)
    return clock.result(setup, {"mean_response_length": sum(lengths) / max(len(lengths), 1)})


# ----------------------------------------------------------------------------------------------- TRL
def run_trl(setup: Setup) -> dict:
    """TRL's GRPOTrainer with a PEFT LoRA config, transformers generation (no vLLM), the same prompts."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lit_ft.metrics import exact_match

    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    data = embedded_prompts(setup, tokenizer)
    dataset = Dataset.from_list([{"prompt": p.text, "reference": p.reference or ""} for p in data.train_prompts])

    def exact_match_reward(completions: list[str], reference: list[str], **_) -> list[float]:
        return [float(exact_match(c.strip(), r)) for c, r in zip(completions, reference)]

    torch.manual_seed(setup.seed)
    model = AutoModelForCausalLM.from_pretrained(
        setup.model_dir, dtype=torch.bfloat16 if setup.gpu else torch.float32, attn_implementation="sdpa",
        **({"device_map": {"": 0}} if setup.gpu else {}))
    rows = setup.prompts * setup.group
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_grpo_"), max_steps=setup.steps,
        per_device_train_batch_size=setup.micro_batch, gradient_accumulation_steps=rows // setup.micro_batch,
        num_generations=setup.group,  # one generation of prompts x G per optimizer step (steps_per_generation =
        # gradient_accumulation_steps by default): no separate old-policy pass, as lit_ft with mu = 1
        max_completion_length=setup.max_new_tokens, temperature=setup.temperature, top_p=1.0, top_k=0,
        num_iterations=1, beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2,
        learning_rate=setup.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", seed=setup.seed, data_seed=setup.seed, use_vllm=False,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=not setup.gpu,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=True,
        log_completions=False,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                             task_type="CAUSAL_LM")
    clock = StepClock(setup.gpu, rows)
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs) -> None:
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            clock.end()

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    trainer = GRPOTrainer(model=model, reward_funcs=exact_match_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    return clock.result(setup, {"mean_response_length": sum(lengths) / max(len(lengths), 1)})


# ----------------------------------------------------------------------------------------------- driver
def child(side: str, setup: Setup) -> dict:
    """Run one side in a fresh interpreter and read its JSON line."""
    cmd = [sys.executable, __file__, "--child", side, "--setup", json.dumps(asdict(setup))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)  # failures reported below
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"bench-rl: the {side} run failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def combine(runs: list[dict]) -> dict:
    """Several rounds of one side as one: samples over seconds summed across rounds, the highest peak memory."""
    out = dict(runs[0])
    for key in ("seconds", "cpu_seconds", "samples", "timed_steps"):
        out[key] = sum(r[key] for r in runs)
    out["samples_per_s"] = out["samples"] / max(out["seconds"], 1e-9)
    out["peak_mib"] = max(r["peak_mib"] for r in runs)
    return out


def report(name: str, r: dict, gpu: bool) -> None:
    memory = "peak CUDA" if gpu else "peak RSS"
    print(f"{name:9s} {r['samples_per_s']:8.2f} samples/s  {r['samples'] / max(r['cpu_seconds'], 1e-9):8.2f} "
          f"samples per CPU-s  {memory} {r['peak_mib']:7.0f} MiB  mean response {r['mean_response_length']:.1f} "
          f"tokens  ({r['timed_steps']} timed steps, {r['seconds']:.1f} s)", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="the CUDA run (default with CUDA)")
    mode.add_argument("--cpu", action="store_true", help="the tiny CPU run even where CUDA is present")
    parser.add_argument("--steps", type=int, default=4, help="rollout batches per run, the first untimed")
    parser.add_argument("--prompts", type=int, help="prompts per step (8 on CPU, 16 on GPU)")
    parser.add_argument("--group", type=int, default=8, help="G, samples per prompt (8: TRL's default)")
    parser.add_argument("--max-new-tokens", type=int, help="longest response (16 on CPU, 128 on GPU)")
    parser.add_argument("--temperature", type=float, default=1.0)  # 1.0: TRL's default
    parser.add_argument("--micro-batch", type=int, default=16,
                        help="responses per forward/backward pass on both sides (a divisor of prompts x G)")
    parser.add_argument("--lr", type=float, default=1e-5)  # 1e-5: TRL's GRPO default
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per side (0: torch's default; 1: on a shared machine, contending "
                             "threads spin and vary single runs severalfold, docs/rollouts.md)")
    parser.add_argument("--rounds", type=int, default=1, help="run the sides alternately this many times")
    parser.add_argument("--sides", default="lit_ft,trl", help="which sides to run, comma-separated")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child == "build":
        make_model_dir(GPU_SHAPE if args.gpu else CPU_SHAPE, args.gpu, Path(args.setup))
        return
    if args.child:
        setup = Setup(**json.loads(args.setup))
        if setup.threads:
            import torch

            torch.set_num_threads(setup.threads)
        print(json.dumps(run_lit_ft(setup) if args.child == "lit_ft" else run_trl(setup)))
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if "trl" in sides and importlib.util.find_spec("trl") is None:
        print("bench-rl: skipped: trl is not installed (pip install -e '.[bench]')")
        return
    import torch

    gpu = args.gpu or (torch.cuda.is_available() and not args.cpu)
    if gpu and not torch.cuda.is_available():
        print("bench-rl: skipped: --gpu needs CUDA")
        return
    shape = GPU_SHAPE if gpu else CPU_SHAPE
    with tempfile.TemporaryDirectory(prefix="bench_rl_model_") as model_dir:
        subprocess.run([sys.executable, __file__, "--child", "build", "--setup", model_dir,
                        "--gpu" if gpu else "--cpu"], check=True)
        setup = Setup(model_dir=model_dir, gpu=gpu, steps=args.steps, prompts=args.prompts or (16 if gpu else 8),
                      group=args.group, max_new_tokens=args.max_new_tokens or (128 if gpu else 16),
                      temperature=args.temperature, lr=args.lr, seed=args.seed, threads=args.threads,
                      micro_batch=args.micro_batch)
        if (setup.prompts * setup.group) % setup.micro_batch:
            raise SystemExit("bench-rl: --micro-batch must divide prompts x G")
        print(f"bench-rl: {'GPU, bf16' if gpu else 'CPU, fp32'} Mistral {asdict(shape)}, "
              f"{setup.prompts} prompts x G {setup.group} per step, {setup.max_new_tokens} new tokens, temperature "
              f"{setup.temperature}, micro-batches of {setup.micro_batch} responses, LoRA r=16 all-linear, beta 0, mu 1, "
              f"{setup.threads or 'default'} torch thread(s), {setup.steps} steps (first untimed)",
              flush=True)
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
        if not gpu and ours["cpu_seconds"] and theirs["cpu_seconds"]:  # CPU time is less disturbed by other work on the machine than wall time
            per_cpu = [r["samples"] / max(r["cpu_seconds"], 1e-9) for r in (ours, theirs)]
            print(f"bench-rl: lit_ft/trl samples per CPU-second ratio = {per_cpu[0] / per_cpu[1]:.2f}")
        print(f"bench-rl: lit_ft/trl samples-per-second ratio = "
              f"{ours['samples_per_s'] / theirs['samples_per_s']:.2f}, "
              f"peak memory ratio = {ours['peak_mib'] / theirs['peak_mib']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
