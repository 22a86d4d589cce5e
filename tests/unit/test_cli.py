"""The command line: recipes run on local stand-ins, and user mistakes end with one clear line (each config
parsing with its own command is in test_configs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_ft.cli import main
from tests.tiny_models import (
    ROOT,
    config_command,
)

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer) -> str:
    from lit_ft.backbone import Backbone, build_model, save_full_model
    from tests.tiny_models import TINY

    torch.manual_seed(0)
    model = build_model(Backbone(pretrained=None, tiny=TINY, lora=None), tokenizer)
    return str(save_full_model(model, tmp_path_factory.mktemp("cli_base") / "tiny", tokenizer))


@pytest.fixture()
def alpaca_like(tmp_path) -> str:
    """A small Alpaca-format file: the real subset's first 64 records where present, else generated ones."""
    real = SHARED_DATA / "alpaca_5000.json"
    if real.exists():
        records = json.loads(real.read_text())[:64]
    else:
        records = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(64)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_7b_recipe_code_path_runs_on_local_stand_ins(tmp_path, monkeypatch, tiny_base, alpaca_like, capsys) -> None:
    """configs/mistral7b_qlora_alpaca.yaml with only the model, data and run length swapped: nf4, LoRA on all
    linear layers, packing, gradient checkpointing, NEFTune, bf16 autocast, adapter export."""
    monkeypatch.chdir(tmp_path)
    recipe = config_command(ROOT / "configs" / "mistral7b_qlora_alpaca.yaml")
    overrides = [
        f"--model.init_args.backbone.pretrained={tiny_base}",
        "--model.init_args.optimizer=torch.optim.AdamW",  # paged AdamW needs CUDA
        f"--data.init_args.source={alpaca_like}",
        "--data.init_args.max_seq_length=512",
        "--data.init_args.num_workers=0",
        "--trainer.max_steps=2",
        "--trainer.accumulate_grad_batches=2",
        "--trainer.val_check_interval=2",
    ]
    main(recipe + overrides)
    out = capsys.readouterr().out
    adapter = tmp_path / "artifacts" / "mistral7b_qlora_alpaca" / "adapter"
    assert (adapter / "adapter_config.json").exists(), out[-2000:]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"] == tiny_base
    targets = {name.split(".")[-1] for name in config["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head
    assert list((tmp_path / "runs" / "mistral7b_qlora_alpaca" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "runs" / "mistral7b_qlora_alpaca" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--data.init_args.source=missing/train.jsonl", "missing/train.jsonl: file not found"),
        ("--model.init_args.backbone.lora.target_modules=[nonexistent_proj]", "target_modules"),
        ("--model.init_args.backbone.pretrained=./no/such/model", "./no/such/model: model/tokenizer directory not found"),
    ],
    ids=["missing-data-file", "lora-matches-nothing", "missing-model-dir"],
)
def test_user_errors_end_with_one_line(tmp_path, monkeypatch, tiny_base, capsys, override, expected) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / "sft.yaml"), f"--model.init_args.backbone.pretrained={tiny_base}",
            "--trainer.max_steps=1", override]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lit-ft: error: ") and expected in err[-1], err[-3:]
    assert "Traceback" not in "\n".join(err)


def test_bad_record_names_file_line_and_field(tmp_path, monkeypatch, tiny_base, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 3}\n')
    args = ["fit", "--config", str(ROOT / "configs" / "sft.yaml"), f"--model.init_args.backbone.pretrained={tiny_base}",
            f"--data.init_args.source={data}", "--data.init_args.format=alpaca", "--data.init_args.val_split_fraction=0"]
    with pytest.raises(SystemExit):
        main(args)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{data}:2" in last and "output" in last, last


def test_sft_trains_on_the_example_alpaca_file(tmp_path, monkeypatch, tiny_base) -> None:
    """The README's bring-your-own-data command, shortened: configs/sft.yaml with examples/data/alpaca.jsonl as
    its source. The standard callbacks run and write under runs/sft; the exported LoRA weights moved from their
    zero start, and the base file is untouched."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    base_weights = {k: v.clone() for k, v in load_file(next(Path(tiny_base).glob("*.safetensors"))).items()}
    main(config_command(ROOT / "configs" / "sft.yaml") + [
        f"--model.init_args.backbone.pretrained={tiny_base}",
        f"--data.init_args.source={ROOT / 'examples' / 'data' / 'alpaca.jsonl'}", "--data.init_args.max_seq_length=128",
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.logger=false",
        "--evaluation.init_args.num_scored=2", "--evaluation.init_args.num_shown=2"])
    adapter = load_file(tmp_path / "artifacts" / "sft" / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # LoRA B starts at zero
    assert (tmp_path / "runs" / "sft" / "checkpoints" / "last.ckpt").is_file()
    after = load_file(next(Path(tiny_base).glob("*.safetensors")))
    assert all(torch.equal(after[k], v) for k, v in base_weights.items())
