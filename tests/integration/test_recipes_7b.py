"""The 7B recipe chain (SFT on Alpaca -> reward model on HH -> PPO and GRPO on HH prompts; DPO on HH pairs from the
same SFT adapter) with its own config overlays, on
a tiny local stand-in: the hub model and datasets are swapped for local files by command-line overrides only.

* One prompt template end to end: the reward model, PPO and DPO render a record exactly as SFT did.
* Each stage runs 2 optimizer steps and writes its adapter with the record of how its base was loaded (NF4, bf16
  compute, the [INST] template); `lit-ft generate`, `score` and `export` then load that base as NF4 with bf16
  compute.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from lit_ft.backbone.base_record import BaseRecord
from lit_ft.cli import main as lit_ft
from lit_ft.data.formats import format_prompt, tokenize_record
from lit_ft.data.preference_formats import tokenize_pair
from lit_ft.data.prompts import record_prompt
from tests.quantised_loading import LoadedBases, assert_nf4_bf16
from tests.tiny_models import ROOT, config_command
from tests.tiny_runs import adapter_weights, save_tiny_base

CONFIGS = ROOT / "configs"
SFT, RM, PPO = "mistral7b_qlora_alpaca.yaml", "mistral7b_qlora_rm_hh.yaml", "mistral7b_qlora_ppo.yaml"
GRPO = "mistral7b_qlora_grpo.yaml"
DPO = "mistral7b_qlora_dpo_hh.yaml"
ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]


def _data_settings(overlay: str) -> dict:
    return yaml.safe_load((CONFIGS / overlay).read_text())["data"]["init_args"]


def _hh(record: dict, answer: str) -> str:
    """The Alpaca record as an HH transcript: the instruction (and input) as the Human turn."""
    human = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    return f"\n\nHuman: {human}\n\nAssistant: {answer}"


@pytest.mark.parametrize("record", ALPACA, ids=["no-input", "with-input"])
def test_rm_and_ppo_render_a_record_exactly_as_sft_did(record, tokenizer) -> None:
    sft, rm, ppo = _data_settings(SFT), _data_settings(RM), _data_settings(PPO)
    trained = tokenize_record(record, tokenizer, sft["format"], sft.get("chat_template"))
    prompt = format_prompt(record, tokenizer, sft["format"], sft.get("chat_template"))
    assert tokenizer.decode(prompt.input_ids).startswith("<s> [INST]")  # Mistral's template, not Alpaca's header
    pair = {"chosen": _hh(record, record["output"]), "rejected": _hh(record, "I cannot say.")}
    scored = tokenize_pair(pair, tokenizer, rm["format"], rm.get("chat_template"))
    assert scored.prompt_ids + scored.chosen_ids == trained["input_ids"]  # the RM sees what SFT trained on
    assert scored.prompt_ids == prompt.input_ids
    sampled = record_prompt(pair, tokenizer, ppo["format"], ppo.get("chat_template"))
    assert sampled.input_ids == prompt.input_ids  # PPO samples from the prompt SFT learned to answer
    dpo = _data_settings(DPO)
    preferred = tokenize_pair(pair, tokenizer, dpo["format"], dpo.get("chat_template"))
    assert preferred.prompt_ids + preferred.chosen_ids == trained["input_ids"]  # DPO raises what SFT trained on


def _write_data(tmp: Path) -> tuple[Path, Path]:
    alpaca = [{"instruction": f"Add {i} and {i % 7}.", "input": "", "output": str(i + i % 7)} for i in range(40)]
    hh = [{"chosen": _hh({"instruction": f"What is {i} plus {i % 5}?", "input": ""}, str(i + i % 5)),
           "rejected": _hh({"instruction": f"What is {i} plus {i % 5}?", "input": ""}, str(i + i % 5 + 1))}
          for i in range(24)]
    (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    (tmp / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh))
    return tmp / "alpaca.jsonl", tmp / "hh.jsonl"


def _fit(overlay: str, base: str, *overrides: str) -> None:
    """The recipe's own command (its first comment line) with the stand-ins and a 2-step run."""
    lit_ft(config_command(CONFIGS / overlay) + [
        f"--model.init_args.backbone.pretrained={base}", "--trainer.max_steps=2", "--data.init_args.num_workers=0",
        *overrides])


def _steps(run: str) -> int:
    ckpt = torch.load(Path("runs") / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["global_step"]


def _digest(directory: str) -> str:
    return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(Path(directory).glob("*.safetensors")))).hexdigest()


@pytest.mark.slow  # three stages in-process, then four tools; the SFT stage's before/after table generates 2 x 128 tokens
# through bitsandbytes' CPU 4-bit matmul: ~2 min CPU (5 min on 2 loaded cores)
def test_each_7b_recipe_runs_two_steps_on_a_stand_in_and_the_tools_load_its_base_in_4_bits(
        tmp_path, monkeypatch, tokenizer, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the recipes' relative runs/ and artifacts/ paths land here
    base = save_tiny_base(tmp_path / "base", tokenizer)
    base_digest = _digest(base)
    alpaca, hh = _write_data(tmp_path)
    small = ["--data.init_args.max_seq_length=128", "--data.init_args.micro_batch_size=2",
             "--trainer.accumulate_grad_batches=1"]
    _fit(SFT, base, f"--data.init_args.source={alpaca}", *small)
    _fit(RM, base, f"--data.init_args.source={hh}", f"--data.init_args.val_source={hh}", *small)
    _fit(PPO, base, f"--data.init_args.source={hh}", f"--data.init_args.val_source={hh}",
         "--data.init_args.micro_batch_size=4", "--model.init_args.ppo.epochs=1", "--model.init_args.ppo.minibatch_size=2",
         "--model.init_args.ppo.forward_batch_size=2", "--model.init_args.sampling.max_new_tokens=8",
         "--model.init_args.evaluation.num_prompts=2", "--model.init_args.evaluation.batch_size=2")
    _fit(GRPO, base, f"--data.init_args.source={hh}", f"--data.init_args.val_source={hh}",
         "--data.init_args.micro_batch_size=2", "--model.init_args.grpo.num_generations=2",
         "--model.init_args.grpo.minibatch_size=2", "--model.init_args.grpo.forward_batch_size=2",
         "--model.init_args.sampling.max_new_tokens=8", "--model.init_args.evaluation.num_prompts=2",
         "--model.init_args.evaluation.batch_size=2")
    _fit(DPO, base, f"--data.init_args.source={hh}", f"--data.init_args.val_source={hh}", *small,
         "--model.init_args.max_new_tokens=8", "--model.init_args.num_eval=2", "--model.init_args.eval_batch_size=2")
    out = capsys.readouterr().out
    assert "grpo: policy from the adapter at artifacts/mistral7b_qlora_alpaca/adapter" in out
    assert "held-out after training, GRPO policy (2 prompts, greedy): mean reward-model score" in out
    assert _steps("mistral7b_qlora_grpo") == 2  # one rollout batch of 2 prompts x 2 samples: 2 minibatches
    grpo = Path("artifacts/mistral7b_qlora_grpo/policy")
    record = BaseRecord.read(grpo)
    assert (record.quantization, record.compute_dtype, record.stage) == ("nf4", "bfloat16", "GRPO")
    assert any(not torch.equal(v, adapter_weights(grpo)[k]) for k, v in adapter_weights(
        Path("artifacts/mistral7b_qlora_alpaca/adapter")).items())  # the policy moved off the SFT adapter
    assert "reward model: starting from the adapter at artifacts/mistral7b_qlora_alpaca/adapter" in out
    assert "ppo: policy from the adapter at artifacts/mistral7b_qlora_alpaca/adapter" in out
    assert "dpo: policy from the adapter at artifacts/mistral7b_qlora_alpaca/adapter" in out
    assert re.search(r"dpo: reference log-probs of \d+ pairs precomputed", out) and "| sigmoid policy" in out
    runs = ("mistral7b_qlora_alpaca", "mistral7b_qlora_rm_hh", "mistral7b_qlora_ppo", "mistral7b_qlora_dpo_hh")
    assert [_steps(r) for r in runs] == [2, 2, 2, 2]

    sft, rm = Path("artifacts/mistral7b_qlora_alpaca/adapter"), Path("artifacts/mistral7b_qlora_rm_hh")
    policy, value = Path("artifacts/mistral7b_qlora_ppo/policy"), Path("artifacts/mistral7b_qlora_ppo/value")
    dpo = Path("artifacts/mistral7b_qlora_dpo_hh/adapter")
    for adapter, stage in ((sft, "CausalLM"), (rm, "RewardModel"), (policy, "PPO"), (value, "PPO"), (dpo, "DPO")):
        record = BaseRecord.read(adapter)
        assert (record.pretrained, record.quantization, record.compute_dtype, record.dtype) == (
            base, "nf4", "bfloat16", "bfloat16"), adapter
        assert (record.prompt_format, record.chat_template, record.stage) == ("chat", "builtin", stage), adapter
    sft_weights = adapter_weights(sft)
    assert any(bool(v.abs().sum()) for k, v in sft_weights.items() if "lora_B" in k)  # trained from B = 0
    assert any(not torch.equal(v, adapter_weights(rm)[k]) for k, v in sft_weights.items())
    dpo_weights = adapter_weights(dpo)  # the DPO policy moved from the SFT adapter it started from
    assert dpo_weights.keys() == sft_weights.keys()
    assert any(not torch.equal(v, dpo_weights[k]) for k, v in sft_weights.items())
    assert _digest(base) == base_digest  # the frozen base never changes

    loaded = LoadedBases(monkeypatch)
    lit_ft(["generate", "--adapter", str(sft), "--prompt", "Add 3 and 4.", "--max_new_tokens", "3", "--no_stream"])
    lit_ft(["generate", "--adapter", str(policy), "--prompt", "What is 1 plus 1?", "--max_new_tokens", "3",
            "--no_stream"])
    lit_ft(["score", "--adapter", str(rm), "--prompt", "What is 1 plus 1?", "--response", "2"])
    lit_ft(["export", "--adapter", str(sft), "--merge", "--out", "merged", "--max_new_tokens", "3"])
    assert len(loaded.models) == 4
    for index in range(4):
        assert_nf4_bf16(loaded, index)
    err = capsys.readouterr().err
    assert err.count("loaded as NF4 with bfloat16 compute") == 4 and "chat prompts" in err
