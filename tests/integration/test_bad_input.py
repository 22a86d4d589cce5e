"""Bad input through the real `lit-ft` command: each case ends before training with exit code 2 and one line on
stderr naming what is wrong, and where (file, line, field) when that applies. No traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lit_ft.cli import main
from tests.tiny_runs import ppo_config, save_tiny_base, sft_config, write_alpaca, write_config


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("bad_input_base") / "tiny", tokenizer)


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _fails_with_one_line(capsys, args: list[str], expected: str) -> str:
    """Run `lit-ft`, expect exit code 2 and exactly one error line containing ``expected``; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and expected in errors[0], errors or err[-2000:]
    return errors[0]


def _sft(tmp_path: Path, base: str, data: Path, *overrides: str) -> list[str]:
    config = write_config(tmp_path / "sft.yaml", sft_config(base, data, tmp_path / "run", max_steps=1, wandb=False))
    return ["fit", "--config", str(config), *overrides]


RECORD_CASES = {
    "malformed-json-line": (['{"instruction": "a", "output": "b"}', '{"instruction": "c", "output": '], ":2: invalid JSON"),
    "missing-field": (['{"instruction": "a", "output": "b"}', '{"instruction": "c"}'], ":2: field 'output': missing"),
    "non-string-field": (['{"instruction": "a", "output": "b"}', '{"instruction": "c", "output": 3}'],
                         ":2: field 'output': expected a string, got int"),
    "empty-response": (['{"instruction": "a", "output": "b"}', '{"instruction": "c", "output": " "}'],
                       ":2: field 'output': empty response"),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_bad_record_names_file_line_and_field(case, base, tmp_path, capsys) -> None:
    lines, expected = RECORD_CASES[case]
    data = _jsonl(tmp_path / "bad.jsonl", lines)
    args = _sft(tmp_path, base, data, "--data.init_args.format=alpaca", "--data.init_args.skip_empty_responses=false")
    line = _fails_with_one_line(capsys, args, expected)
    assert line.startswith(f"lit-ft: error: {data}:2"), line


def test_missing_file(base, tmp_path, capsys) -> None:
    _fails_with_one_line(capsys, _sft(tmp_path, base, tmp_path / "nope.jsonl"), f"{tmp_path / 'nope.jsonl'}: file not found")


def test_prompt_longer_than_max_seq_length_with_truncation_off(base, tmp_path, capsys) -> None:
    data = _jsonl(tmp_path / "long.jsonl", [json.dumps({"instruction": "short", "output": "x"}),
                                            json.dumps({"instruction": "word " * 200, "output": "x"})])
    line = _fails_with_one_line(capsys, _sft(tmp_path, base, data, "--data.init_args.overlong=error"),
                                "longer than max_seq_length=128: its prompt alone is")
    assert f"{data}:2" in line


def test_zero_usable_examples(base, tmp_path, capsys) -> None:
    data = _jsonl(tmp_path / "long.jsonl", [json.dumps({"instruction": "word " * 200, "output": "x"})] * 3)
    _fails_with_one_line(capsys, _sft(tmp_path, base, data, "--data.init_args.overlong=drop"),
                         f"{data}: no usable training examples (3 of 3 dropped")


def test_unknown_format(base, tmp_path, capsys) -> None:
    data = write_alpaca(tmp_path / "ok.jsonl", 4)
    _fails_with_one_line(capsys, _sft(tmp_path, base, data, "--data.init_args.format=sharegpt"),
                         "unknown format 'sharegpt'")


def test_config_key_that_does_not_exist(base, tmp_path, capsys) -> None:
    """LightningCLI's own message: exit code 2, the key named, no traceback."""
    data = write_alpaca(tmp_path / "ok.jsonl", 4)
    with pytest.raises(SystemExit) as exit_info:
        main(_sft(tmp_path, base, data, "--model.init_args.no_such_option=1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_option" in err and "Traceback" not in err, err[-2000:]


def test_lora_targets_that_match_nothing(base, tmp_path, capsys) -> None:
    data = write_alpaca(tmp_path / "ok.jsonl", 4)
    _fails_with_one_line(capsys, _sft(tmp_path, base, data, "--model.init_args.backbone.lora.target_modules=[nope_proj]"),
                         "lora.target_modules=['nope_proj']: ")


def test_tokenizer_without_pad_token_trains_padding_with_unk(base, tmp_path, capsys) -> None:
    """Not an error: a tokenizer without a pad token pads with its unk token (Mistral's case) and the run trains."""
    import mistral_common
    from transformers import AutoTokenizer

    from lit_ft.backbone import load_tokenizer

    directory = tmp_path / "tokenizer"
    directory.mkdir()
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", directory / "tokenizer.model")
    raw = AutoTokenizer.from_pretrained(str(directory))
    assert raw.pad_token is None
    raw.save_pretrained(directory)
    tok = load_tokenizer(str(directory))
    assert tok.pad_token_id == tok.unk_token_id != tok.eos_token_id
    data = write_alpaca(tmp_path / "ok.jsonl", 8)
    main(_sft(tmp_path, base, data, f"--model.init_args.backbone.tokenizer={directory}"))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert "error" not in capsys.readouterr().err.lower()


def test_chosen_identical_to_rejected(base, tmp_path, capsys) -> None:
    """Identical pairs are dropped and counted; when nothing else is left, one line says so."""
    data = _jsonl(tmp_path / "pairs.jsonl", [json.dumps({"prompt": f"q{i}", "chosen": "same", "rejected": "same"})
                                             for i in range(3)])
    config = sft_config(base, data, tmp_path / "run", max_steps=1, wandb=False)
    config["model"] = {"class_path": "lit_ft.stages.reward_model.RewardModel",
                       "init_args": {"backbone": dict(config["model"]["init_args"]["backbone"], init_adapter=None)}}
    config["data"] = {"class_path": "lit_ft.data.preference.PreferenceDataModule",
                      "init_args": {"source": str(data), "val_split_fraction": 0.0, "max_seq_length": 64}}
    args = ["fit", "--config", str(write_config(tmp_path / "rm.yaml", config))]
    _fails_with_one_line(capsys, args, f"{data}: no usable training pairs (3 of 3 dropped: 3 identical")


@pytest.mark.parametrize("role, expected", [("policy_adapter", "policy adapter not found"),
                                            ("reward_model", "not a reward model export")])
def test_missing_adapter_directory_for_ppo(role, expected, base, tmp_path, capsys) -> None:
    config = write_config(tmp_path / "ppo.yaml", ppo_config(base, tmp_path / "run", wandb=False))
    missing = tmp_path / "no_such_adapter"
    line = _fails_with_one_line(capsys, ["fit", "--config", str(config), f"--model.init_args.{role}={missing}"],
                                expected)
    assert str(missing) in line
