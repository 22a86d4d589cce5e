"""Inference: prompts rendered exactly as in training, greedy/streamed/sampled generation, and the base-vs-tuned
comparison table, on a tiny base with a LoRA adapter."""

from __future__ import annotations

import json

import pytest
import torch

from lit_ft.backbone import Backbone, BackboneError, build_model, save_adapter, save_full_model
from lit_ft.backbone.base_record import BaseRecord
from lit_ft.data.formats import format_alpaca_prompt, tokenize_record
from lit_ft.errors import ConfigError
from lit_ft.tools import chat
from lit_ft.tools.generate import (
    Sampling,
    adapter_source,
    build_parser,
    build_prompts,
    generate_one,
    greedy_generate,
    main,
    sampling_from,
)
from tests.quantised_loading import (
    LoadedBases,
    assert_nf4_bf16,
    fails_in_one_line,
    save_nf4_adapter,
    sft_model_with_random_b,
)
from tests.tiny_models import TINY

PROMPTS = ["What is 3 + 4?", "Reverse the letters: c a t"]
PROMPT_ARGS = [arg for p in PROMPTS for arg in ("--prompt", p)]


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tokenizer) -> tuple[str, str]:
    """A tiny base and a LoRA adapter on it whose B matrices are non-zero (so that it changes the output)."""
    tmp = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    base = str(save_full_model(build_model(Backbone(tiny=TINY, lora=None), tokenizer), tmp / "base", tokenizer))
    return base, str(save_adapter(sft_model_with_random_b(base, tokenizer), tmp / "adapter", "sft", tokenizer))


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


def test_generate_and_chat_read_the_same_sampling_flags() -> None:
    flags = ["--sample", "--temperature", "0.5", "--top_p", "0.8", "--top_k", "3", "--seed", "9"]
    ours = sampling_from(build_parser().parse_args(["--prompt", "x", *flags]))
    theirs = sampling_from(chat.build_parser().parse_args(["--model", "m", *flags]))
    assert ours == Sampling(64, True, 0.5, 0.8, 3, 9) and theirs == Sampling(256, True, 0.5, 0.8, 3, 9)
    assert ours.generate_kwargs() == {"do_sample": True, "temperature": 0.5, "top_p": 0.8, "top_k": 3}
    assert Sampling(temperature=0.0).generate_kwargs() == {"do_sample": False}  # greedy ignores the knobs
    with pytest.raises(ConfigError, match=r"^--temperature must be positive when sampling, got 0.0$"):
        sampling_from(chat.build_parser().parse_args(["--model", "m", "--sample", "--temperature", "0"]))


def test_generate_one_is_the_batched_greedy_text(tiny_adapter, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_adapter[0])
    ids = [p.input_ids for p in build_prompts([{"instruction": q} for q in PROMPTS], tokenizer)]
    assert [generate_one(model, tokenizer, i, Sampling(max_new_tokens=5)) for i in ids] == greedy_generate(
        model, tokenizer, ids, 5)


def test_an_adapter_that_names_no_base_needs_base(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(BackboneError, match="the adapter does not name its base model; pass --base"):
        adapter_source(str(tmp_path), None)
    assert adapter_source(str(tmp_path), "some/base") == ("some/base", None)


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


# ------------------------------------------------------------------------- loading as trained (lit_ft_base.json)
@pytest.fixture(scope="module")
def nf4_adapter(tmp_path_factory, tiny_adapter, tokenizer) -> tuple[str, str]:
    base, _ = tiny_adapter
    return base, save_nf4_adapter(tmp_path_factory.mktemp("nf4_adapter") / "adapter", base, tokenizer)


def test_a_4bit_trained_adapter_loads_its_base_as_nf4_with_bf16_compute(nf4_adapter, monkeypatch, capsys) -> None:
    _, adapter = nf4_adapter
    loaded = LoadedBases(monkeypatch)
    [result] = main(["--adapter", adapter, "--prompt", PROMPTS[0], "--max_new_tokens", "3", "--no_stream"])
    assert_nf4_bf16(loaded)
    err = capsys.readouterr().err
    assert "loaded as NF4 with bfloat16 compute" in err and "chat prompts" in err  # the record's template too
    assert result["generation"]


def test_flags_override_the_record(nf4_adapter, monkeypatch) -> None:
    _, adapter = nf4_adapter
    loaded = LoadedBases(monkeypatch)
    args = ["--adapter", adapter, "--prompt", PROMPTS[0], "--max_new_tokens", "2", "--no_stream"]
    main(args + ["--dtype", "float32"])
    assert {dtype for _, dtype in loaded.linear_4bit()} == {torch.float32}
    main(args + ["--no-load-in-4bit"])
    base_weights = {p.dtype for n, p in loaded.models[-1].named_parameters() if "lora_" not in n}
    assert not loaded.linear_4bit() and base_weights == {torch.bfloat16}


def test_no_new_tokens_is_one_line(tiny_adapter, capsys) -> None:
    _, adapter = tiny_adapter
    fails_in_one_line(capsys, ["generate", "--adapter", adapter, "--prompt", "Hi", "--max_new_tokens", "0"],
                       "--max_new_tokens must be at least 1, got 0")


def test_an_adapter_on_another_base_is_one_line(tiny_adapter, other_base, capsys) -> None:
    _, adapter = tiny_adapter
    line = fails_in_one_line(capsys, ["generate", "--adapter", adapter, "--base", other_base, "--prompt", "Hi"],
                              "the adapter does not fit the base model")
    assert line.startswith(f"lit-ft: error: {adapter}:") and "size mismatch" in line


def test_an_adapter_for_more_layers_than_the_base_has_is_one_line(tiny_adapter, tmp_path, tokenizer, capsys) -> None:
    """A base with fewer layers: PEFT would load the adapter partly and only warn."""
    import dataclasses

    _, adapter = tiny_adapter
    torch.manual_seed(2)
    model = build_model(Backbone(tiny=dataclasses.replace(TINY, num_hidden_layers=1), lora=None), tokenizer)
    shallow = str(save_full_model(model, tmp_path / "shallow", tokenizer))
    fails_in_one_line(capsys, ["generate", "--adapter", adapter, "--base", shallow, "--prompt", "Hi"],
                       "adapter tensors match no module of the base model")


# ------------------------------------------------------------------------- host memory of a 4-bit generate
RSS_BOUND = 1.5  # the bound: peak memory of the model's load within 1.5x its quantised size


def _stand_in(directory, tokenizer, hidden: int, intermediate: int, layers: int) -> tuple[str, str]:
    """A Mistral-shaped base (random bfloat16 weights, saved in Hub format in 64 MB shards) and a 4-bit record
    adapter on it."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                           max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM._from_config(config, dtype=torch.bfloat16)
    base = directory / "base"
    model.save_pretrained(base, max_shard_size="64MB")
    tokenizer.save_pretrained(base)
    del model
    return str(base), save_nf4_adapter(directory / "adapter", str(base), tokenizer, prompt_format="alpaca")


# `lit-ft generate` (lit_ft.cli.main), then this process's own peak RSS: VmHWM restarts at exec, while rusage's
# ru_maxrss of a child also counts the pytest process it was forked from.
PEAK_RSS_SCRIPT = """
import sys
from lit_ft.cli import main
try:
    main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as out:
        out.write(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
"""


def _peak_rss_mib(adapter: str, report) -> float:
    """Peak resident memory (MiB) of a `lit-ft generate` subprocess on ``adapter``."""
    import os
    import subprocess
    import sys

    from tests.tiny_models import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-c", PEAK_RSS_SCRIPT, str(report), "generate", "--adapter", adapter, "--prompt", "Hi",
               "--max_new_tokens", "2", "--no_stream"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(report.read_text()) / 1024  # kB


@pytest.mark.slow  # two generate subprocesses and an NF4 load of a 185M-parameter model: ~1 min CPU, 3.5 min loaded
def test_generate_on_a_4bit_adapter_holds_about_the_quantised_model_in_memory(tmp_path, tokenizer) -> None:
    """A 185M-parameter stand-in (370 MB in bfloat16, 740 MB in float32): what loading it adds to the peak RSS of
    `lit-ft generate` is measured against the same command on a 12 MB model, and must stay within 1.5x the model's
    NF4 size (~180 MB). Loaded in float32 as before, the increase was ~950 MB (5.4x)."""
    import shutil

    from lit_ft.backbone import load_base_model

    try:
        _, big = _stand_in(tmp_path / "big", tokenizer, hidden=1024, intermediate=3584, layers=8)
        _, small = _stand_in(tmp_path / "small", tokenizer, hidden=64, intermediate=128, layers=2)
        increase = _peak_rss_mib(big, tmp_path / "big.rss") - _peak_rss_mib(small, tmp_path / "small.rss")
        nf4 = load_base_model(BaseRecord.read(big).backbone(), tokenizer)
        quantised = nf4.get_memory_footprint() / 2**20
        del nf4
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    print(f"peak RSS increase {increase:.0f} MiB for a {quantised:.0f} MiB NF4 model ({increase / quantised:.2f}x)")
    assert increase <= RSS_BOUND * quantised, (increase, quantised)
