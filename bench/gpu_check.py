"""``make gpu-check``: the 7B recipe chain on one GPU with no network, measured against ``lit-ft estimate``.

    python bench/gpu_check.py                  # CUDA: Mistral-7B shape, <= 8 min on one H200
    python bench/gpu_check.py --size tiny      # the same script with tiny shapes (CPU without CUDA; `make test`)

Every step runs the project's own commands on a model and data it makes itself (a GPU machine lent for the
check cannot download Mistral-7B or Alpaca):

1. ``build``: a Mistral-7B-shaped model with random weights (bf16) and the embedded Mistral-7B-v0.1 tokenizer,
   saved in Hub format, so that each stage loads it through the recipe's own path (``from_pretrained`` with
   ``BitsAndBytesConfig`` and a device map), not through a hand-quantised copy;
2. ``sft``: 20 QLoRA SFT steps of configs/mistral7b_qlora_alpaca.yaml (packed 2048 x 4, NF4, LoRA r=16 on all
   linears, checkpointing, paged AdamW) on generated Alpaca-format records;
3. ``rm``: reward-model steps of configs/mistral7b_qlora_rm_hh.yaml, starting from the SFT adapter;
4. ``ppo``: one rollout and its update with configs/mistral7b_qlora_ppo.yaml (the SFT policy, the reward model);
5. ``generate``: ``lit-ft generate`` on the saved SFT adapter;
6. ``bench/sft_vs_trl.py --gpu`` on the same model directory and records (skipped when trl is missing).

Each stage is ``lit-ft`` with the recipe's config command (the first line of the config) and overrides for the
model, the data, the run length and the output folder; the only changes to the recipe's settings are
``accumulate_grad_batches: 1`` (20 micro-batches, not 80: memory per micro-batch is the same) and no W&B logger. On
CUDA each stage is its own process (its own peak memory, nothing left over from the one before); the parent never
touches the GPU. ``--in-process`` runs them in this process instead (the CPU test: no interpreter start-ups).

Printed per stage and written to ``<out>/report.json`` and ``<out>/report.txt``: wall time, measured peak memory
(CUDA: torch's peak allocated since training started; CPU: the process's peak RSS) beside the estimate of
lit_ft.callbacks.memory (lit-ft estimate for the live run), tokens per second and MFU from
lit_ft.callbacks.throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SFT, RM, PPO = "mistral7b_qlora_alpaca.yaml", "mistral7b_qlora_rm_hh.yaml", "mistral7b_qlora_ppo.yaml"
SFT_ADAPTER = "artifacts/mistral7b_qlora_alpaca/adapter"  # the recipes' own export paths, relative to the run folder
PEAK_MARK = "gpu-check peak: "


@dataclass
class Size:
    """Model shape and run lengths of one variant."""

    shape: dict[str, int]
    sft_steps: int
    seq_length: int
    micro_batch: int
    rm_steps: int
    rm_seq_length: int
    ppo_prompts: int
    new_tokens: int
    records: int
    bench: list[str]


_MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8}  # Mistral-7B-v0.1's config.json (vocabulary: the embedded tokenizer's)
SIZES = {
    # The recipe's shapes; 16 prompts per rollout (the recipe: 64) with 4 per forward pass as in the recipe.
    "7b": Size(_MISTRAL_7B, sft_steps=20, seq_length=2048, micro_batch=4, rm_steps=3, rm_seq_length=1024,
               ppo_prompts=16, new_tokens=128, records=700, bench=["--gpu", "--steps", "8"]),
    "tiny": Size({"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2}, sft_steps=2, seq_length=256, micro_batch=2, rm_steps=2,
                 rm_seq_length=256, ppo_prompts=4, new_tokens=8, records=40,
                 bench=["--cpu", "--steps", "2", "--examples", "40", "--seq", "256", "--micro-batch", "2"]),
}


@dataclass
class StageResult:
    """What one stage measured (None where it does not apply or was not printed)."""

    name: str
    seconds: float
    ok: bool
    peak_gib: float | None = None
    peak_kind: str = ""
    estimate_gib: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    note: str = ""
    command: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- model and data
def build_model(directory: Path, size: str) -> None:
    """Random Mistral weights of ``size`` in bf16 with the embedded tokenizer, saved in Hub format."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from lit_ft.backbone import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = MistralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           tie_word_embeddings=False, max_position_embeddings=32768, sliding_window=4096,
                           rope_theta=10000.0, **SIZES[size].shape)  # Mistral-7B-v0.1's positions and window
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 7B: built in bf16 on the GPU, never in fp32
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"gpu-check: saved a random {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B-parameter Mistral "
          f"to {directory}", flush=True)


_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "da", "ve", "zo", "an", "el", "or", "um"]


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def _recipe_format(config: str) -> str:
    """The ``data.init_args.format`` a recipe reads (the generated records follow it)."""
    import yaml

    data = yaml.safe_load((ROOT / "configs" / config).read_text()).get("data", {})
    return str((data.get("init_args") or {}).get("format", "auto"))


def write_data(directory: Path, size: str) -> dict[str, Path]:
    """Generated records: Alpaca SFT examples (long enough to fill packed rows), preference pairs and prompts in
    the formats the RM and PPO recipes read."""
    rng, n = random.Random(0), SIZES[size].records
    long = size == "7b"
    sft = [{"instruction": f"Describe the {_words(rng, 2)} of {_words(rng, 3)}.", "input": "",
            "output": _words(rng, rng.randint(150, 700) if long else rng.randint(8, 40))} for _ in range(n)]
    pairs = []
    for _ in range(n):
        question = f"What is the {_words(rng, 2)} of {_words(rng, rng.randint(20, 200) if long else 4)}?"
        pairs.append((question, _words(rng, rng.randint(10, 120) if long else 6), _words(rng, rng.randint(10, 120)
                                                                                        if long else 6)))

    def preference(fmt: str, q: str, a: str, b: str) -> dict:
        if fmt == "hh":
            return {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}"}
        if fmt == "alpaca":
            return {"instruction": q, "input": "", "chosen": a, "rejected": b}
        return {"prompt": q, "chosen": a, "rejected": b}

    rm_format, ppo_format = _recipe_format(RM), _recipe_format(PPO)
    paths = {"sft": directory / "alpaca.json", "rm": directory / "pairs.jsonl", "ppo": directory / "prompts.jsonl"}
    paths["sft"].write_text(json.dumps(sft))
    paths["rm"].write_text("".join(json.dumps(preference(rm_format, *p)) + "\n" for p in pairs))
    paths["ppo"].write_text("".join(json.dumps(preference(ppo_format, *p)) + "\n" for p in pairs))
    return paths


# ------------------------------------------------------------------------------------------------ the stages
def recipe_command(config: str) -> list[str]:
    """``lit-ft`` arguments from the config's first comment line (``# lit-ft fit --config ...``), paths absolute."""
    first = (ROOT / "configs" / config).read_text().splitlines()[0]
    args = shlex.split(first[len("# lit-ft "):].split("  ")[0])
    return [str(ROOT / a) if a.startswith("configs/") else a for a in args]


def stage_commands(size: str, model_dir: Path, data: dict[str, Path], gpu: bool) -> list[tuple[str, list[str]]]:
    """(stage, lit-ft arguments) for SFT, RM, PPO and generate: the recipes with overrides."""
    s = SIZES[size]
    common = [f"--model.init_args.backbone.pretrained={model_dir}", "--trainer.logger=false",
              "--trainer.accumulate_grad_batches=1", "--data.init_args.num_workers=0"]
    if not gpu:
        common += ["--model.init_args.optimizer=torch.optim.AdamW"]  # paged AdamW needs CUDA
    sft = recipe_command(SFT) + common + [
        f"--data.init_args.source={data['sft']}", f"--data.init_args.max_seq_length={s.seq_length}",
        f"--data.init_args.micro_batch_size={s.micro_batch}", f"--trainer.max_steps={s.sft_steps}",
        f"--trainer.val_check_interval={s.sft_steps}", "--trainer.limit_val_batches=2"]
    rm = recipe_command(RM) + common + [
        f"--data.init_args.source={data['rm']}", "--data.init_args.val_source=null",
        "--data.init_args.val_split_fraction=0.1", f"--data.init_args.max_seq_length={s.rm_seq_length}",
        f"--trainer.max_steps={s.rm_steps}", f"--trainer.val_check_interval={s.rm_steps}",
        "--trainer.limit_val_batches=2"]
    ppo = recipe_command(PPO) + common + [
        f"--data.init_args.source={data['ppo']}", "--data.init_args.val_source=null",
        "--data.init_args.val_split_fraction=0.1", f"--data.init_args.micro_batch_size={s.ppo_prompts}",
        f"--model.init_args.ppo.minibatch_size={s.ppo_prompts}", "--model.init_args.ppo.epochs=1",
        f"--model.init_args.sampling.max_new_tokens={s.new_tokens}", "--model.init_args.evaluation.num_prompts=4",
        "--model.init_args.evaluation.batch_size=4", "--trainer.max_steps=1"]  # one rollout, one update
    generate = ["generate", "--adapter", SFT_ADAPTER, "--prompt", "Describe the kalo of mine suta.", "--prompt",
                "What is the ta of rivo?", "--max_new_tokens", str(s.new_tokens), "--no_stream"]
    return [("sft", sft), ("rm", rm), ("ppo", ppo), ("generate", generate)]


def run_cli(argv: list[str]) -> None:
    """One ``lit-ft`` command, then this process's peak memory on a marked line."""
    from lit_ft.callbacks.memory import peak_rss
    from lit_ft.cli import main

    main(argv)
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    print(PEAK_MARK + json.dumps({"bytes": peak, "kind": "allocated" if cuda else "RSS"}), flush=True)


class _Tee(io.TextIOBase):
    """Writes to the console and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def launch(argv: list[str], cwd: Path, in_process: bool) -> tuple[bool, str]:
    """Run a lit-ft command in ``cwd``: in this process, or in a child whose output is shown and kept."""
    if in_process:
        tee, previous = _Tee(sys.stdout), Path.cwd()
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(tee):
                run_cli(argv)
            return True, tee.copy.getvalue()
        except SystemExit as err:
            return err.code in (0, None), tee.copy.getvalue()
        finally:
            os.chdir(previous)
    return _child([sys.executable, __file__, "--cli", json.dumps(argv)], cwd)


def _child(cmd: list[str], cwd: Path) -> tuple[bool, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    return proc.wait() == 0, "".join(lines)


_MEMORY = re.compile(r"^memory: (?:run peak allocated (?P<alloc>[\d.]+) GiB[^;\n]*|peak RSS (?P<rss>[\d.]+) GiB)"
                     r"(?:; estimate (?P<est>[\d.]+) GiB allocated)?", re.MULTILINE)
_THROUGHPUT = re.compile(r"^throughput: (?P<tok>[\d,.]+) tokens/s[^\n]*?(?:MFU (?P<mfu>[\d.]+)%)?(?: on |$)", re.MULTILINE)


def parse(name: str, ok: bool, output: str, seconds: float, command: list[str]) -> StageResult:
    """The stage's measurements from its printed lines (lit_ft.callbacks.memory/throughput, the peak mark)."""
    result = StageResult(name, seconds, ok, command=command)
    if (m := _MEMORY.search(output)) is not None:
        result.peak_kind = "allocated" if m["alloc"] else "RSS"
        result.peak_gib = float(m["alloc"] or m["rss"])
        result.estimate_gib = float(m["est"]) if m["est"] else None
    elif PEAK_MARK in output:
        peak = json.loads(output.rsplit(PEAK_MARK, 1)[1].splitlines()[0])
        result.peak_gib, result.peak_kind = peak["bytes"] / 1024**3, peak["kind"]
    if (m := _THROUGHPUT.search(output)) is not None:
        result.tokens_per_s = float(m["tok"].replace(",", ""))
        result.mfu = float(m["mfu"]) / 100 if m["mfu"] else None
    if not ok:
        result.note = output.strip().splitlines()[-1][:200] if output.strip() else "failed"
    return result


def table(results: list[StageResult]) -> str:
    header = (f"{'stage':<10} {'time s':>7} {'peak GiB':>9} {'estimate':>9} {'meas/est':>9} {'tokens/s':>10} "
              f"{'MFU':>6}  note")
    rows = [header]
    for r in results:
        ratio = f"{r.peak_gib / r.estimate_gib:.2f}" if r.peak_gib and r.estimate_gib else ""
        rows.append(f"{r.name:<10} {r.seconds:>7.0f} {_num(r.peak_gib, '.2f'):>9} {_num(r.estimate_gib, '.2f'):>9} "
                    f"{ratio:>9} {_num(r.tokens_per_s, ',.0f'):>10} {_num(r.mfu and 100 * r.mfu, '.1f'):>6}  "
                    f"{'' if r.ok else 'FAILED '}{r.peak_kind}{'; ' + r.note if r.note else ''}")
    return "\n".join(rows)


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[StageResult]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="7b with CUDA (default), tiny without")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check", help="run folder and report")
    parser.add_argument("--in-process", action="store_true", help="run the stages in this process (CPU test)")
    parser.add_argument("--skip-bench", action="store_true", help="leave out bench/sft_vs_trl.py")
    parser.add_argument("--cli", help=argparse.SUPPRESS)  # a child: one lit-ft command (JSON list)
    parser.add_argument("--build", help=argparse.SUPPRESS)  # a child: build the model of --size here
    args = parser.parse_args(argv)
    if args.cli:
        return run_cli(json.loads(args.cli)) or []
    import torch

    gpu = torch.cuda.is_available()  # asks the driver; creates no CUDA context in this process
    size = args.size or ("7b" if gpu else "tiny")
    threads = torch.get_num_threads()
    if size == "tiny":  # tiny matmuls gain nothing from threads, and on a busy machine the thread pool spins
        torch.set_num_threads(1)
    try:
        return _check(args, size, gpu)
    finally:
        torch.set_num_threads(threads)


def _check(args: argparse.Namespace, size: str, gpu: bool) -> list[StageResult]:
    """Build, run the stages, run the bench, write the report."""
    if args.build:
        return build_model(Path(args.build), size) or []
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir, results = out / "model", []
    print(f"gpu-check: {size} on {'CUDA' if gpu else 'CPU'}, stages {'in process' if args.in_process else 'as processes'}"
          f", run folder {out}", flush=True)
    start = time.perf_counter()
    if args.in_process:
        build_model(model_dir, size)
        ok = True
    else:
        ok, _ = _child([sys.executable, __file__, "--size", size, "--build", str(model_dir)], out)
    results.append(StageResult("build", time.perf_counter() - start, ok))
    data = write_data(out, size)
    for name, command in stage_commands(size, model_dir, data, gpu) if ok else []:
        print(f"gpu-check: {name}: lit-ft {' '.join(command)}", flush=True)
        begin = time.perf_counter()
        stage_ok, output = launch(command, out, args.in_process)
        results.append(parse(name, stage_ok, output, time.perf_counter() - begin, command))
        if not stage_ok and name in ("sft", "rm"):  # the later stages start from these adapters
            break
    if not args.skip_bench and ok:
        bench = [sys.executable, str(ROOT / "bench" / "sft_vs_trl.py"), *SIZES[size].bench, "--data", str(data["sft"]),
                 "--model-dir", str(model_dir)]
        begin = time.perf_counter()
        bench_ok, output = _child(bench, out)
        last = output.strip().splitlines()[-1] if output.strip() else ""
        results.append(StageResult("sft_vs_trl", time.perf_counter() - begin, bench_ok, note=last, command=bench))
    report = table(results)
    print(f"\ngpu-check ({size}, {time.perf_counter() - start:.0f} s in all):\n{report}")
    (out / "report.txt").write_text(report + "\n")
    (out / "report.json").write_text(json.dumps({"size": size, "gpu": gpu, "seconds": time.perf_counter() - start,
                                                 "stages": [asdict(r) for r in results]}, indent=1))
    return results


if __name__ == "__main__":
    results = main()
    sys.exit(0 if all(r.ok for r in results) else 1)
