"""Inference: prompts rendered exactly as in training, greedy/streamed/sampled generation, and the base-vs-tuned
comparison table, on a tiny base with a LoRA adapter."""

from __future__ import annotations

import json

import pytest
import torch

from lit_ft.backbone import Backbone, LoraSettings, build_model, save_adapter, save_full_model
from lit_ft.callbacks.evaluation import greedy_generate
from lit_ft.data.formats import format_alpaca_prompt, tokenize_record
from lit_ft.tools.generate import build_prompts, main
from tests.tiny_models import TINY

PROMPTS = ["What is 3 + 4?", "Reverse the letters: c a t"]
PROMPT_ARGS = [arg for p in PROMPTS for arg in ("--prompt", p)]


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tokenizer) -> tuple[str, str]:
    """A tiny base and a LoRA adapter on it whose B matrices are non-zero (so that it changes the output)."""
    tmp = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    base = str(save_full_model(build_model(Backbone(tiny=TINY, lora=None), tokenizer), tmp / "base", tokenizer))
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, adapter_name="sft")
    model = build_model(Backbone(pretrained=base, lora=lora), tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return base, str(save_adapter(model, tmp / "adapter", "sft", tokenizer))


def test_prompts_are_the_training_prompts(tokenizer) -> None:
    [alpaca] = build_prompts([{"instruction": "Sort the digits: 3 1 2", "input": ""}], tokenizer, "alpaca")
    trained = tokenize_record({"instruction": "Sort the digits: 3 1 2", "output": "1 2 3"}, tokenizer, "alpaca")
    assert alpaca.text == format_alpaca_prompt("Sort the digits: 3 1 2")
    assert trained["input_ids"][: len(alpaca.input_ids)] == alpaca.input_ids
    assert trained["labels"][len(alpaca.input_ids) - 1] == -100 and trained["labels"][len(alpaca.input_ids)] != -100
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    [chat] = build_prompts([{"messages": messages}], tokenizer, "chat")
    trained = tokenize_record({"messages": messages}, tokenizer, "chat")
    assert trained["input_ids"][: len(chat.input_ids)] == chat.input_ids and chat.reference == "Hello"
    [chat_from_text] = build_prompts([{"instruction": "Hi there"}], tokenizer, "chat")
    assert chat_from_text.input_ids == chat.input_ids


def test_compare_prints_base_and_tuned_side_by_side(tiny_adapter, tokenizer, capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = tiny_adapter
    results = main(["--adapter", adapter, "--compare", "--max_new_tokens", "6"]
                   + PROMPT_ARGS)
    out = capsys.readouterr().out
    assert "before instruction tuning" in out and "after instruction tuning" in out
    assert all(p in out for p in PROMPTS)
    ids = [p.input_ids for p in build_prompts([{"instruction": p} for p in PROMPTS], tokenizer, "alpaca")]
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    assert [r["base"] for r in results] == greedy_generate(plain, tokenizer, ids, 6)
    assert [r["generation"] for r in results] == greedy_generate(tuned, tokenizer, ids, 6)
    assert [r["base"] for r in results] != [r["generation"] for r in results]


def test_streamed_greedy_text_is_printed_and_equals_batched_greedy(tiny_adapter, tokenizer, capsys) -> None:
    _, adapter = tiny_adapter
    streamed = main(["--adapter", adapter, "--max_new_tokens", "6"] + PROMPT_ARGS)
    out = capsys.readouterr().out
    batched = main(["--adapter", adapter, "--max_new_tokens", "6", "--compare"]
                   + PROMPT_ARGS)
    assert [r["generation"] for r in streamed] == [r["generation"] for r in batched]
    for prompt, result in zip(PROMPTS, streamed):
        assert f"### {prompt}" in out and result["generation"].strip() in out


def test_sampling_repeats_with_its_seed(tiny_adapter) -> None:
    _, adapter = tiny_adapter
    args = ["--adapter", adapter, "--prompt", PROMPTS[0], "--sample", "--temperature", "1.5", "--top_p", "1.0",
            "--max_new_tokens", "8", "--no_stream"]
    first, again = main(args + ["--seed", "3"]), main(args + ["--seed", "3"])
    assert first[0]["generation"] == again[0]["generation"]


def test_file_of_prompts_with_references(tiny_adapter, tmp_path, capsys) -> None:
    _, adapter = tiny_adapter
    rows = [{"instruction": "What is 3 + 4?", "output": "7"}, {"instruction": "What is 1 + 1?", "output": "2"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = main(["--adapter", adapter, "--file", str(path), "--compare", "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert [r["reference"] for r in results] == ["7", "2"]
    assert "reference" in out and "exact match: base " in out
