"""``lit-ft export``: a training checkpoint or an adapter, out as a PEFT adapter or as one merged transformers model.

    lit-ft export --checkpoint runs/sft/checkpoints/last.ckpt --out artifacts/sft/exported   # the adapter alone
    lit-ft export --adapter artifacts/sft/adapter --merge --out artifacts/sft/merged          # LoRA merged in
    lit-ft export --adapter artifacts/sft/adapter --merge --out merged --push-to-hub me/tiny-sft --private

A checkpoint (``runs/*/checkpoints/*.ckpt``) holds the trainable parameters and the ``backbone`` settings, so the
model is rebuilt as it was trained (same base, same quantisation, same LoRA) and the LoRA tensors loaded into it; a
reward model's checkpoint also gives its score head and reward statistics, so that ``lit-ft score`` takes the export.
An adapter directory loads on its base as its ``lit_ft_base.json`` says it was trained; every export writes that
record too. ``--dtype`` and ``--load-in-4bit/--no-load-in-4bit`` override how the base loads
(:mod:`lit_ft.tools.loading`).

``--merge`` writes a plain transformers model (safetensors, config, generation config, tokenizer) that loads with
``AutoModelForCausalLM.from_pretrained`` and no PEFT. LoRA is never merged into 4-bit weights:

* base trained unquantised: ``W + (alpha/r) B A`` in the dtype the base loads in;
* base trained in NF4 (QLoRA): the 4-bit weights the adapter was trained against are dequantised one layer at a
  time into the compute dtype (bfloat16 for the 7B recipe; never the whole model in float32), then the LoRA is
  merged into them (``--merge_onto dequantized``, the default); ``--merge_onto original`` reloads the base's own
  16-bit weights in the compute dtype instead, which differ from what the adapter saw by the quantisation error.

The merged model is saved in that dtype (``--dtype``; by default the training compute dtype: bfloat16 for the 7B
recipe, float32 for the embedded base; without a record, the base's saved dtype). Then the export is reloaded with
plain transformers and compared with the model as trained (base + adapter, in 4 bits for QLoRA) on a few prompts:
the merge error is the largest logit difference, and the greedy generations are checked for equality. On CPU,
bfloat16 greedy text can differ from float32 where two tokens are nearly tied.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lit_ft.backbone import (
    DTYPES,
    Backbone,
    BackboneError,
    LoraSettings,
    TinyConfig,
    add_adapter,
    load_adapter,
    load_base_model,
    load_tokenizer,
    resolve_init_adapter,
    save_adapter,
    save_full_model,
)
from lit_ft.backbone.base_record import BaseRecord, prompt_format_of
from lit_ft.data.formats import Prompt
from lit_ft.stages.reward_model import HEAD_FILE, STATS_FILE, write_reward_files
from lit_ft.tools.generate import PROMPT_FORMATS, Sampling, build_prompts, generate_texts, prompt_rows
from lit_ft.tools.loading import (
    adapter_base,
    add_loading_flags,
    base_spec,
    describe,
    load_with_adapter,
)

# Prompts the merge is checked on when none are given: one per kind of embedded task, plus free text.
CHECK_PROMPTS = (
    "What is 3 + 4?",
    "Reverse the letters: c a t",
    "Sort the digits: 9 9 4",
    "Give three tips for staying healthy.",
)


@dataclass
class Trained:
    """The model as it was trained (base + adapter), what it came from, how its base loads now (``spec``) and how
    it loaded in training (``record``); ``reward``: a reward model's score head state and statistics."""

    model: Any
    tokenizer: Any
    adapter_name: str
    spec: Backbone
    record: BaseRecord
    source: str
    reward: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    recorded: bool = True  # False: an adapter made elsewhere, without lit_ft_base.json

    @property
    def base(self) -> str:
        return self.spec.pretrained

    @property
    def dtype(self) -> str:
        """The dtype the model computes in: the 4-bit matmuls' for NF4, the weights' otherwise."""
        return self.spec.compute_dtype if self.spec.quantization == "nf4" else self.spec.dtype


@dataclass
class MergeReport:
    """How far the merged export is from the model as trained, on the check prompts."""

    max_logit_diff: float
    positions: int
    prompts: int
    same_greedy: int
    reference: str
    merged_dtype: str
    merged_onto: str

    def line(self) -> str:
        return (f"merge error: max |logit difference| {self.max_logit_diff:.3g} over {self.positions} positions of "
                f"{self.prompts} prompts, {self.reference} vs the merged export ({self.merged_dtype}, merged onto "
                f"{self.merged_onto} weights); greedy generations identical for {self.same_greedy}/{self.prompts}")


def _backbone(value: Any) -> Backbone:
    """The ``backbone`` hyper-parameter: a Backbone already, or the dict LightningCLI stores."""
    if isinstance(value, Backbone):
        return value
    if not isinstance(value, dict):
        raise BackboneError("the checkpoint has no backbone settings (hyper_parameters.backbone)")
    known = {f.name for f in dataclasses.fields(Backbone)}
    spec = {k: v for k, v in value.items() if k in known}
    if isinstance(spec.get("tiny"), dict):
        spec["tiny"] = TinyConfig(**spec["tiny"])
    if isinstance(spec.get("lora"), dict):
        spec["lora"] = LoraSettings(**spec["lora"])
    return Backbone(**spec)


def _adapter_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the LoRA adapters whose tensors a checkpoint's state dict holds."""
    return sorted({key.split("lora_A.", 1)[1].split(".", 1)[0] for key in state if "lora_A." in key})


def _reward_parts(ckpt: dict, spec: Backbone, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A reward-model checkpoint's score head and the ``reward_stats.json`` its export needs (as
    :meth:`lit_ft.stages.reward_model.RewardModel.reward_stats` writes it)."""
    state = ckpt["state_dict"]
    head = {"weight": state["score_head.weight"], "bias": state["score_head.bias"]}
    data = ckpt.get("datamodule_hyper_parameters") or {}
    prompt_format = prompt_format_of(data.get("format"), data.get("source", "unknown"))
    stats = {
        "mean": float(state.get("reward_mean", torch.zeros(()))),
        "std": float(state.get("reward_std", torch.ones(()))),
        "adapter_name": adapter_name,
        "base_model": spec.pretrained,
        "hidden_size": int(head["weight"].shape[1]),
        "prompt_format": prompt_format and ("alpaca" if prompt_format == "alpaca" else "chat"),  # what score renders
        "chat_template": data.get("chat_template"),
        "global_step": int(ckpt.get("global_step", 0)),
    }
    return head, stats


def load_checkpoint(path: str, dtype: str | None = None, load_in_4bit: bool | None = None) -> Trained:
    """Rebuild a checkpoint's model as trained: its backbone (base, quantisation, LoRA), then its LoRA tensors."""
    if not Path(path).is_file():
        raise BackboneError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # the backbone dataclasses are allow-listed
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or not a checkpoint: torch's many error types
        raise BackboneError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    spec = _backbone(ckpt.get("hyper_parameters", {}).get("backbone"))
    if spec.lora is None:
        raise BackboneError(f"{path}: a full-parameter checkpoint (pre-training) has no adapter to export; its "
                            "model is written to the run's export_dir")
    if spec.pretrained is None:
        raise BackboneError(f"{path}: the base was built from scratch (backbone.pretrained is null), so it cannot "
                            "be rebuilt for export")
    state = ckpt.get("state_dict", {})
    names = _adapter_names(state)
    if len(names) != 1:
        raise BackboneError(f"{path}: holds the adapters {', '.join(names) or '(none)'}, not one; a PPO run writes "
                            "its policy and value adapters to its export_dir")
    name = names[0]
    spec = dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, adapter_name=name))
    data = ckpt.get("datamodule_hyper_parameters") or {}
    reward = _reward_parts(ckpt, spec, name) if "score_head.weight" in state else None
    record = BaseRecord.of(spec, prompt_format_of(data.get("format"), data.get("source", "unknown")),
                           data.get("chat_template"), stage="RewardModel" if reward else "CausalLM")
    load = base_spec(spec.pretrained, record, dtype, load_in_4bit)
    tokenizer = load_tokenizer(spec.tokenizer or spec.pretrained)
    on_gpu = torch.cuda.is_available()
    model = load_base_model(load, tokenizer, {"": "cuda:0"} if on_gpu and load.quantization != "none" else None)
    init = resolve_init_adapter(spec)  # the RM's LoRA shape came from the SFT adapter it started from
    model = load_adapter(model, init, name) if init is not None else add_adapter(model, spec.lora, trainable=False)
    lora = {k.removeprefix("model."): v for k, v in state.items() if f".{name}." in k and "lora_" in k}
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters() if f".{name}." in k and "lora_" in k}
    if not lora or {k: tuple(v.shape) for k, v in lora.items()} != shapes:
        raise BackboneError(f"{path}: its LoRA tensors for adapter '{name}' do not match the rebuilt model "
                            f"({len(set(lora) & set(shapes))} of {len(shapes)} found with their shapes)")
    model.load_state_dict(lora, strict=False)
    if on_gpu and load.quantization == "none":
        model = model.to("cuda")
    model.eval()
    model.config.use_cache = True
    return Trained(model, tokenizer, name, load, record, path, reward)


def load_adapter_dir(adapter: str, base: str | None = None, dtype: str | None = None,
                     load_in_4bit: bool | None = None) -> Trained:
    """An adapter directory on its base, loaded as it was trained (its ``lit_ft_base.json``), with overrides."""
    record = BaseRecord.read(adapter) if Path(adapter).is_dir() else None
    base = base or adapter_base(adapter, record)
    if not base:
        raise BackboneError(f"{adapter}: the adapter does not name its base model; pass --base")
    spec = base_spec(base, record, dtype, load_in_4bit)
    model, tokenizer = load_with_adapter(spec, adapter, "tuned")
    recorded = record is not None
    if record is None:  # an adapter made elsewhere: record how it was loaded here
        record = BaseRecord.of(spec, stage="lit-ft export")
    reward = None
    if (Path(adapter) / HEAD_FILE).is_file() and (Path(adapter) / STATS_FILE).is_file():
        from safetensors.torch import load_file

        reward = (load_file(str(Path(adapter) / HEAD_FILE)), json.loads((Path(adapter) / STATS_FILE).read_text()))
    return Trained(model, tokenizer, "tuned", spec, record, adapter, reward, recorded)


@torch.no_grad()
def prompt_logits(model, prompts: list[Prompt], continuations: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits at every position of each prompt followed by its continuation, one prompt at a time."""
    device = next(model.parameters()).device
    out = []
    for prompt, extra in zip(prompts, continuations):
        ids = torch.tensor([prompt.input_ids + extra], device=device)
        out.append(model(input_ids=ids, use_cache=False).logits[0].float().cpu())
    return out


def resolve_dtype(dtype: str, base: str) -> str:
    """``auto``: the dtype the base was saved in (its config), bfloat16 when that cannot be read."""
    if dtype != "auto":
        return dtype
    from transformers import AutoConfig

    try:
        saved = AutoConfig.from_pretrained(os.path.expanduser(base)).dtype
    except (OSError, ValueError):  # a hub id while offline
        saved = None
    name = str(saved).replace("torch.", "") if saved is not None else None
    return name if name in DTYPES else "bfloat16"


def merged_dtype(trained: Trained, dtype: str | None) -> str:
    """The dtype of the merged weights: ``--dtype``, else the dtype the adapter was trained to compute in (its
    record), else the base's saved dtype."""
    if dtype is not None:
        return dtype
    return trained.dtype if trained.recorded else resolve_dtype("auto", trained.base)


def merged_model(trained: Trained, adapter_dir: Path, onto: str, dtype: str):
    """The base with the LoRA merged in, in ``dtype``, never into 4-bit weights (see the module docstring).

    An NF4 base is dequantised one linear layer at a time into ``dtype`` (transformers' ``dequantize``), so the
    largest transient is one layer, not a float32 copy of the model."""
    from peft import PeftModel

    torch_dtype = DTYPES[dtype]
    if trained.spec.quantization == "none":
        return trained.model.merge_and_unload().to(torch_dtype)
    if onto == "dequantized":
        base = trained.model.unload()  # drops the LoRA layers: the 4-bit base as trained
        base = base.dequantize(dtype=torch_dtype)
    else:
        original = dataclasses.replace(trained.spec, quantization="none", dtype=dtype)
        base = load_base_model(original, trained.tokenizer)
    base = base.to(torch_dtype)  # the weights that were never quantised (embeddings, norms, head)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def export_merged(trained: Trained, out: Path, dtype: str, onto: str, prompts: list[Prompt],
                  max_new_tokens: int = 16) -> MergeReport:
    """Merge, save as a plain transformers model, reload it without PEFT and measure the merge error."""
    from transformers import AutoModelForCausalLM

    sampling = Sampling(max_new_tokens=max_new_tokens)
    reference_text = generate_texts(trained.model, trained.tokenizer, prompts, sampling)
    continuations = [trained.tokenizer.encode(t, add_special_tokens=False) for t in reference_text]
    reference_logits = prompt_logits(trained.model, prompts, continuations)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = save_adapter(trained.model, Path(tmp) / "adapter", trained.adapter_name)
        merged = merged_model(trained, adapter_dir, onto, dtype)
    merged.config.use_cache = True  # the training setting (off) must not ship in the export
    merged.generation_config.pad_token_id = trained.tokenizer.pad_token_id
    nf4 = trained.spec.quantization == "nf4"
    merged_onto = "dequantized NF4" if nf4 and onto == "dequantized" else "original"
    meta = {"merged_from": trained.source, "base": trained.base, "trained_quantization": trained.record.quantization,
            "merged_onto": merged_onto, "dtype": dtype, "prompt_format": trained.record.prompt_format,
            "chat_template": trained.record.chat_template}
    save_full_model(merged, out, trained.tokenizer, metadata=meta)
    del merged, trained.model
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=DTYPES[dtype]).eval()
    if torch.cuda.is_available():
        reloaded = reloaded.to("cuda")
    merged_text = generate_texts(reloaded, trained.tokenizer, prompts, sampling)
    merged_logits = prompt_logits(reloaded, prompts, continuations)
    diff = max(float((a - b).abs().max()) for a, b in zip(reference_logits, merged_logits))
    reference = "base + adapter" + (" (NF4, as trained)" if nf4 else f" ({trained.dtype})")
    report = MergeReport(diff, sum(x.shape[0] for x in merged_logits), len(prompts),
                         sum(a == b for a, b in zip(reference_text, merged_text)), reference, dtype, merged_onto)
    meta["merge_error"] = {"max_logit_diff": diff, "same_greedy": report.same_greedy, "prompts": report.prompts}
    (out / "lit_ft.json").write_text(json.dumps(meta, indent=2))
    return report


def export_adapter(trained: Trained, out: Path) -> Path:
    """The adapter in PEFT format with its tokenizer and base record; a reward model's score head and statistics
    too, so that ``lit-ft score`` takes the folder."""
    out = save_adapter(trained.model, out, trained.adapter_name, trained.tokenizer, trained.record)
    if trained.reward is not None:
        head, stats = trained.reward
        write_reward_files(out, head, dict(stats, adapter_name=trained.adapter_name))
    return out


def push_to_hub(folder: Path, repo: str, private: bool) -> str:
    """Upload ``folder`` to the hub repo ``repo`` (created when missing) with the token from the environment
    (``HF_TOKEN``, or ``huggingface-cli login``); any failure is one line, the local export being complete."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get("HF_TOKEN") or None)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="lit-ft export")
    except Exception as err:  # noqa: BLE001 - offline, no token, no permission (the client's own error types)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"--push-to-hub {repo}: upload failed ({type(err).__name__}: {reason}); the local "
                            f"export in {folder} is complete") from None
    return f"https://huggingface.co/{repo}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-ft export",
                                     description="Export a checkpoint or an adapter: the adapter, or merged.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint (runs/*/checkpoints/*.ckpt)")
    source.add_argument("--adapter", help="a PEFT adapter directory")
    parser.add_argument("--out", required=True, help="the output directory (replaced when it exists)")
    parser.add_argument("--merge", action="store_true", help="merge the LoRA into the base: a plain transformers model")
    add_loading_flags(parser)
    parser.add_argument("--merge_onto", choices=("dequantized", "original"), default="dequantized",
                        help="NF4-trained adapters: merge onto the dequantised 4-bit weights it was trained against, "
                             "or onto the base's original weights")
    parser.add_argument("--base", help="--adapter: its base model (default: the one its lit_ft_base.json names)")
    parser.add_argument("--prompt", action="append", help="a prompt for the merge check (default: a fixed few)")
    parser.add_argument("--file", help="prompts for the merge check: one a line (.txt) or records")
    parser.add_argument("--format", choices=PROMPT_FORMATS,
                        help="prompt template for the check (default: the one the adapter was trained with)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="greedy tokens compared per check prompt")
    parser.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO", help="upload the export to this repo")
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    return parser


def main(argv: list[str] | None = None) -> MergeReport | None:
    """Parse arguments and export; returns the merge report (None without --merge)."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.checkpoint:
        trained = load_checkpoint(args.checkpoint, args.dtype, args.load_in_4bit)
    else:
        trained = load_adapter_dir(args.adapter, args.base, args.dtype, args.load_in_4bit)
    print(f"lit-ft export: {trained.base} loaded as {describe(trained.spec)}", file=sys.stderr)
    report = None
    if not args.merge:
        export_adapter(trained, out)
        kind = "reward model" if trained.reward is not None else "adapter"
        print(f"lit-ft export: {kind} of {trained.source} (base {trained.base}) written to {out}")
    else:
        dtype = merged_dtype(trained, args.dtype)
        fmt = args.format or trained.record.prompt_format or "alpaca"
        rows, locations = prompt_rows(args.prompt or (None if args.file else list(CHECK_PROMPTS)), args.file)
        prompts = build_prompts(rows, trained.tokenizer, fmt, trained.record.chat_template, locations=locations)
        report = export_merged(trained, out, dtype, args.merge_onto, prompts, args.max_new_tokens)
        print(f"lit-ft export: merged model written to {out} (loads with AutoModelForCausalLM.from_pretrained)")
        print(report.line())
    if args.push_to_hub:
        print(f"lit-ft export: pushed to {push_to_hub(out, args.push_to_hub, args.private)}")
    return report
