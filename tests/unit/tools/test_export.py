"""Export: checkpoints and adapters out as PEFT adapters, or merged into a plain transformers model that gives the
same greedy text as base + adapter (fp32 training, and NF4 training through the dequantised merge)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_ft.backbone import Backbone, build_model, save_full_model
from lit_ft.backbone.base_record import BaseRecord
from lit_ft.data.formats import format_prompt
from lit_ft.tools.export import main, resolve_dtype
from tests.quantised_loading import LoadedBases, assert_nf4_bf16, fails_in_one_line, save_nf4_adapter
from tests.tiny_models import TINY
from tests.unit.stages.test_causal_lm import _fit

PROMPTS = ["What is 3 + 4?", "Reverse the letters: c a t", "Sort the digits: 9 9 4", "How many letters are in: a b"]
PROMPT_ARGS = [arg for p in PROMPTS for arg in ("--prompt", p)]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer) -> str:
    torch.manual_seed(0)
    model = build_model(Backbone(pretrained=None, tiny=TINY, lora=None), tokenizer)
    return str(save_full_model(model, tmp_path_factory.mktemp("export_base") / "tiny", tokenizer))


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp("fp32_run")
    module, _ = _fit(tmp, tiny_base, max_steps=2)
    return tmp, module


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp("nf4_run")
    module, _ = _fit(tmp, tiny_base, max_steps=2, quantization="nf4")
    return tmp, module


@torch.no_grad()
def _greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 12) -> list[list[int]]:
    """Greedy token ids, one unpadded prompt at a time, with plain ``generate`` (independent of lit_ft.tools.generate)."""
    out = []
    for text in prompts:
        ids = torch.tensor([format_prompt({"instruction": text, "output": ""}, tokenizer, "alpaca").input_ids])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _export(args: list[str], capsys) -> tuple[object, str]:
    report = main(args + PROMPT_ARGS)
    return report, capsys.readouterr().out


def test_merged_fp32_export_loads_without_peft_and_matches_base_plus_adapter(fp32_run, tiny_base, tokenizer,
                                                                             capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, _ = fp32_run
    out = tmp / "merged"
    report, printed = _export(["--checkpoint", str(tmp / "ckpt" / "last.ckpt"), "--merge", "--dtype", "float32",
                               "--out", str(out)], capsys)
    assert "merge error: max |logit difference|" in printed
    assert report.max_logit_diff < 1e-4 and report.same_greedy == len(PROMPTS) == report.prompts
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"} <= files
    assert "adapter_config.json" not in files
    assert json.loads((out / "lit_ft.json").read_text())["merge_error"]["max_logit_diff"] == report.max_logit_diff

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in name for name in merged.state_dict())
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(tmp / "adapter")).eval()
    expected = _greedy(tuned, tokenizer, PROMPTS)
    assert _greedy(merged, tokenizer, PROMPTS) == expected
    with tuned.disable_adapter():
        assert _greedy(tuned, tokenizer, PROMPTS) != expected  # the adapter matters: a merge that lost it fails


def test_merged_nf4_export_matches_the_4bit_model_it_was_trained_on(nf4_run, capsys) -> None:
    from transformers import AutoModelForCausalLM

    tmp, _ = nf4_run
    ckpt = str(tmp / "ckpt" / "last.ckpt")
    report, printed = _export(["--checkpoint", ckpt, "--merge", "--dtype", "float32", "--out", str(tmp / "m")],
                              capsys)
    assert "(NF4, as trained)" in printed and "merged onto dequantized NF4 weights" in printed
    assert report.max_logit_diff < 1e-3 and report.same_greedy == len(PROMPTS)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp / "m"))
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())


@pytest.mark.slow
def test_nf4_merge_onto_original_weights_misses_what_the_adapter_saw(nf4_run, capsys) -> None:
    tmp, _ = nf4_run
    ckpt = str(tmp / "ckpt" / "last.ckpt")
    dequantized, _ = _export(["--checkpoint", ckpt, "--merge", "--dtype", "float32", "--out", str(tmp / "d")], capsys)
    original, printed = _export(["--checkpoint", ckpt, "--merge", "--dtype", "float32", "--merge_onto", "original",
                                 "--out", str(tmp / "o")], capsys)
    assert "merged onto original weights" in printed
    assert original.max_logit_diff > 10 * max(dequantized.max_logit_diff, 1e-6)


def test_adapter_export_from_a_checkpoint_loads_with_peft(fp32_run, tiny_base) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, module = fp32_run
    out = tmp / "exported_adapter"
    assert main(["--checkpoint", str(tmp / "ckpt" / "last.ckpt"), "--out", str(out)]) is None
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(out)).eval()
    ids = torch.randint(3, 32000, (1, 12))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.model(input_ids=ids).logits)


def test_push_to_hub_offline_fails_in_one_line_after_the_local_export(fp32_run, monkeypatch, capsys) -> None:
    from lit_ft.cli import main as cli_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tmp, _ = fp32_run
    out = tmp / "pushed"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--adapter", str(tmp / "adapter"), "--out", str(out), "--push-to-hub", "me/tiny-sft",
                  "--private"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lit-ft: error: --push-to-hub me/tiny-sft: upload failed") and str(out) in err[-1]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()


def test_auto_dtype_is_the_bases_saved_dtype(tiny_base, tmp_path) -> None:
    assert resolve_dtype("auto", tiny_base) == "float32"
    config = json.loads((Path(tiny_base) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, dtype="bfloat16")))
    assert resolve_dtype("auto", str(tmp_path)) == "bfloat16"
    assert resolve_dtype("auto", "no-such-org/no-such-model") == "bfloat16"  # unreadable offline
    assert resolve_dtype("float16", tiny_base) == "float16"


# ------------------------------------------------------------------------- loading as trained (lit_ft_base.json)
def test_every_export_records_how_its_base_was_loaded(nf4_run, capsys) -> None:
    tmp, _ = nf4_run
    trained = BaseRecord.read(tmp / "adapter")  # the trainer's own export
    assert (trained.quantization, trained.compute_dtype, trained.prompt_format) == ("nf4", "float32", "alpaca")
    main(["--checkpoint", str(tmp / "ckpt" / "last.ckpt"), "--out", str(tmp / "from_ckpt")])
    main(["--adapter", str(tmp / "adapter"), "--out", str(tmp / "from_adapter")])
    for out in ("from_ckpt", "from_adapter"):
        record = BaseRecord.read(tmp / out)
        assert (record.quantization, record.compute_dtype, record.pretrained) == ("nf4", "float32", trained.pretrained)
        assert record.prompt_format == "alpaca"


def test_merging_a_4bit_adapter_dequantises_layer_by_layer_in_bf16(tiny_base, tokenizer, tmp_path, monkeypatch,
                                                                    capsys) -> None:
    from transformers import AutoModelForCausalLM, PreTrainedModel

    adapter = save_nf4_adapter(tmp_path / "adapter", tiny_base, tokenizer)
    loaded = LoadedBases(monkeypatch)
    dequantized_in = []
    real = PreTrainedModel.dequantize

    def dequantize(self, dtype=None):
        dequantized_in.append(dtype)
        return real(self, dtype=dtype)

    monkeypatch.setattr(PreTrainedModel, "dequantize", dequantize)
    report = main(["--adapter", adapter, "--merge", "--out", str(tmp_path / "merged"), "--max_new_tokens", "4"])
    assert_nf4_bf16(loaded)
    assert dequantized_in == [torch.bfloat16]  # transformers replaces one Linear4bit at a time
    assert "(NF4, as trained)" in capsys.readouterr().out and report.merged_dtype == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    meta = json.loads((tmp_path / "merged" / "lit_ft.json").read_text())
    assert meta["prompt_format"] == "chat" and meta["trained_quantization"] == "nf4"


def test_export_of_an_adapter_onto_another_base_is_one_line(fp32_run, other_base, capsys) -> None:
    tmp, _ = fp32_run
    adapter = str(tmp / "adapter")
    for extra in ([], ["--merge"]):
        line = fails_in_one_line(capsys, ["export", "--adapter", adapter, "--base", other_base,
                                           "--out", str(tmp / "wrong"), *extra], "the adapter does not fit")
        assert line.startswith(f"lit-ft: error: {adapter}:")
    assert not (tmp / "wrong").exists()
