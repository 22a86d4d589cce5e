"""``lit-ft export``: a training checkpoint or an adapter, out as a PEFT adapter or as one merged transformers model.

    lit-ft export --checkpoint runs/sft/checkpoints/last.ckpt --out artifacts/sft/exported   # the adapter alone
    lit-ft export --adapter artifacts/sft/adapter --merge --out artifacts/sft/merged          # LoRA merged in
    lit-ft export --adapter artifacts/sft/adapter --merge --out merged --push-to-hub me/tiny-sft --private

A checkpoint (``runs/*/checkpoints/*.ckpt``) holds the trainable parameters and the ``backbone`` settings, so the
model is rebuilt as it was trained (same base, same quantisation, same LoRA) and the LoRA tensors loaded into it.

``--merge`` writes a plain transformers model (safetensors, config, generation config, tokenizer) that loads with
``AutoModelForCausalLM.from_pretrained`` and no PEFT. LoRA is never merged into 4-bit weights:

* base trained unquantised: ``W + (alpha/r) B A`` in the training dtype, then cast to ``--dtype``;
* base trained in NF4 (QLoRA): the 4-bit weights the adapter was trained against are dequantised, then the LoRA is
  merged into them (``--merge_onto dequantized``, the default); ``--merge_onto original`` reloads the base's own
  16-bit weights instead, which differ from what the adapter saw by the quantisation error.

Then the export is reloaded with plain transformers and compared with the model as trained (base + adapter, in
4 bits for QLoRA) on a few prompts: the merge error is the largest logit difference, and the greedy generations are
checked for equality. ``--dtype auto`` keeps the base's saved dtype (bfloat16 for Mistral-7B, float32 for the
embedded base); on CPU, bfloat16 greedy text can differ from float32 where two tokens are nearly tied.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
    build_model,
    load_tokenizer,
    save_adapter,
    save_full_model,
)
from lit_ft.data.formats import Prompt
from lit_ft.tools.generate import (
    PROMPT_FORMATS,
    Sampling,
    adapter_base,
    build_prompts,
    default_compute_dtype,
    generate_texts,
    load_causal_lm,
    prompt_rows,
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
    """The model as it was trained (base + adapter), what it came from, and how to rebuild its base."""

    model: Any
    tokenizer: Any
    adapter_name: str
    base: str
    quantization: str
    dtype: str
    compute_dtype: str
    source: str


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


def load_checkpoint(path: str) -> Trained:
    """Rebuild a checkpoint's model as trained: its backbone (base, quantisation, LoRA), then its LoRA tensors."""
    if not Path(path).is_file():
        raise BackboneError(f"{path}: checkpoint not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # the backbone dataclasses are allow-listed
    spec = _backbone(ckpt.get("hyper_parameters", {}).get("backbone"))
    if spec.lora is None:
        raise BackboneError(f"{path}: a full-parameter checkpoint (pre-training) has no adapter to export; its "
                            "model is written to the run's export_dir")
    if spec.pretrained is None:
        raise BackboneError(f"{path}: the base was built from scratch (backbone.pretrained is null), so it cannot "
                            "be rebuilt for export")
    on_gpu = torch.cuda.is_available()
    spec = dataclasses.replace(spec, gradient_checkpointing=False)
    if not on_gpu and spec.quantization == "nf4":
        spec = dataclasses.replace(spec, compute_dtype="float32")  # CPU has no fast bf16 matmul
    tokenizer = load_tokenizer(spec.tokenizer or spec.pretrained)
    model = build_model(spec, tokenizer, device_map={"": "cuda:0"} if on_gpu and spec.quantization != "none" else None)
    name = spec.lora.adapter_name
    lora = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if f".{name}." in k and "lora_" in k}
    expected = {k for k in model.state_dict() if f".{name}." in k and "lora_" in k}
    if not lora or set(lora) != expected:
        raise BackboneError(f"{path}: its LoRA tensors for adapter '{name}' do not match the rebuilt model "
                            f"({len(set(lora) & expected)} of {len(expected)} found)")
    model.load_state_dict(lora, strict=False)
    if on_gpu and spec.quantization == "none":
        model = model.to("cuda")
    model.eval()
    model.config.use_cache = True
    return Trained(model, tokenizer, name, spec.pretrained, spec.quantization, spec.dtype, spec.compute_dtype, path)


def load_adapter_dir(adapter: str, base: str | None, quantization: str, compute_dtype: str | None) -> Trained:
    """An adapter directory on its base, loaded as it was trained (``quantization``: how the base was loaded)."""
    base = base or adapter_base(adapter)
    if not base:
        raise BackboneError(f"{adapter}: the adapter does not name its base model; pass --base")
    compute = compute_dtype or default_compute_dtype()
    model, tokenizer = load_causal_lm(base, adapter, quantization, "float32", compute)
    return Trained(model, tokenizer, "tuned", base, quantization, "float32", compute, adapter)


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


def merged_model(trained: Trained, adapter_dir: Path, onto: str):
    """The base with the LoRA merged in, never into 4-bit weights (see the module docstring); in float32 or the
    training dtype, cast by the caller."""
    from peft import PeftModel

    if trained.quantization == "none":
        return trained.model.merge_and_unload()
    if onto == "dequantized":
        base = trained.model.unload()  # drops the LoRA layers: the 4-bit base as trained
        base.dequantize()
    else:
        base = build_model(Backbone(pretrained=trained.base, dtype="float32", lora=None), trained.tokenizer)
    base = base.to(torch.float32)
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
        merged = merged_model(trained, adapter_dir, onto).to(DTYPES[dtype])
    merged.config.use_cache = True  # the training setting (off) must not ship in the export
    merged.generation_config.pad_token_id = trained.tokenizer.pad_token_id
    merged_onto = "dequantized NF4" if trained.quantization == "nf4" and onto == "dequantized" else "original"
    meta = {"merged_from": trained.source, "base": trained.base, "trained_quantization": trained.quantization,
            "merged_onto": merged_onto, "dtype": dtype}
    save_full_model(merged, out, trained.tokenizer, metadata=meta)
    del merged, trained.model
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=DTYPES[dtype]).eval()
    if torch.cuda.is_available():
        reloaded = reloaded.to("cuda")
    merged_text = generate_texts(reloaded, trained.tokenizer, prompts, sampling)
    merged_logits = prompt_logits(reloaded, prompts, continuations)
    diff = max(float((a - b).abs().max()) for a, b in zip(reference_logits, merged_logits))
    reference = "base + adapter" + (" (NF4, as trained)" if trained.quantization == "nf4" else f" ({trained.dtype})")
    report = MergeReport(diff, sum(x.shape[0] for x in merged_logits), len(prompts),
                         sum(a == b for a, b in zip(reference_text, merged_text)), reference, dtype, merged_onto)
    meta["merge_error"] = {"max_logit_diff": diff, "same_greedy": report.same_greedy, "prompts": report.prompts}
    (out / "lit_ft.json").write_text(json.dumps(meta, indent=2))
    return report


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
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="dtype of the merged weights (auto: the base's saved dtype)")
    parser.add_argument("--merge_onto", choices=("dequantized", "original"), default="dequantized",
                        help="NF4-trained adapters: merge onto the dequantised 4-bit weights it was trained against, "
                             "or onto the base's original weights")
    parser.add_argument("--base", help="--adapter: its base model (default: the one its config names)")
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none",
                        help="--adapter: how the base was loaded in training (nf4 for QLoRA adapters)")
    parser.add_argument("--compute_dtype", choices=tuple(DTYPES), help="NF4 matmul dtype (default: bf16 on GPU)")
    parser.add_argument("--prompt", action="append", help="a prompt for the merge check (default: a fixed few)")
    parser.add_argument("--file", help="prompts for the merge check: one a line (.txt) or records")
    parser.add_argument("--format", choices=PROMPT_FORMATS, default="alpaca", help="prompt template for the check")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="greedy tokens compared per check prompt")
    parser.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO", help="upload the export to this repo")
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    return parser


def main(argv: list[str] | None = None) -> MergeReport | None:
    """Parse arguments and export; returns the merge report (None without --merge)."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.checkpoint:
        trained = load_checkpoint(args.checkpoint)
    else:
        trained = load_adapter_dir(args.adapter, args.base, args.quantization, args.compute_dtype)
    report = None
    if not args.merge:
        save_adapter(trained.model, out, trained.adapter_name, trained.tokenizer)
        print(f"lit-ft export: adapter of {trained.source} (base {trained.base}) written to {out}")
    else:
        dtype = resolve_dtype(args.dtype, trained.base)
        rows, locations = prompt_rows(args.prompt or (None if args.file else list(CHECK_PROMPTS)), args.file)
        prompts = build_prompts(rows, trained.tokenizer, args.format, locations=locations)
        report = export_merged(trained, out, dtype, args.merge_onto, prompts, args.max_new_tokens)
        print(f"lit-ft export: merged model written to {out} (loads with AutoModelForCausalLM.from_pretrained)")
        print(report.line())
    if args.push_to_hub:
        print(f"lit-ft export: pushed to {push_to_hub(out, args.push_to_hub, args.private)}")
    return report
