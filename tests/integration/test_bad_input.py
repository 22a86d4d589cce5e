"""Bad input through the real `lit-ft` command: each case ends before training with exit code 2 and one line on
stderr naming what is wrong, and where (file, line, field) when that applies. No traceback, and no file outside
the run's own directories changes (the other runs, the data, the working directory).

Covered: bad records and data files; bad option values (parser errors, a negative learning rate, LoRA settings);
checkpoints that are missing, empty, truncated, corrupt, a folder, weights-only, from another stage, or from a run
the config does not continue (base model, LoRA shape, adapter name, data, run length); output directories that
cannot be written or have no room; a disk that fills up during the run. `--debug` and LIT_FT_DEBUG=1 show the
traceback instead."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from lit_ft.cli import main
from lit_ft.errors import ConfigError
from lit_ft.stages.run_contract import RECORD_KEY
from tests.tiny_runs import ppo_config, save_tiny_base, sft_config, write_alpaca, write_config


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("bad_input_base") / "tiny", tokenizer)


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _files(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` (top level only for the working directory), ``skip`` left out."""
    paths = root.iterdir() if root == Path.cwd() else root.rglob("*")
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)
            if p.is_file() and (skip is None or skip not in p.parents)}


def _fails_with_one_line(capsys, args: list[str], expected: str, tmp_path: Path | None = None,
                         also: tuple[Path, ...] = ()) -> str:
    """Run `lit-ft`, expect exit code 2 and exactly one error line containing ``expected``; return that line.

    No file outside the run's own directory (``tmp_path/run``) changes: under ``tmp_path``, under ``also`` and in
    the working directory.
    """
    watched = [Path.cwd(), *also] + ([tmp_path] if tmp_path is not None else [])
    own = tmp_path / "run" if tmp_path is not None else None
    before = [_files(root, own) for root in watched]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and expected in errors[0], errors or err[-2000:]
    assert [_files(root, own) for root in watched] == before, "a file outside the run's own directory changed"
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
    line = _fails_with_one_line(capsys, args, expected, tmp_path)
    assert line.startswith(f"lit-ft: error: {data}:2"), line


def test_missing_file(base, tmp_path, capsys) -> None:
    _fails_with_one_line(capsys, _sft(tmp_path, base, tmp_path / "nope.jsonl"), f"{tmp_path / 'nope.jsonl'}: file not found", tmp_path)


def test_prompt_longer_than_max_seq_length_with_truncation_off(base, tmp_path, capsys) -> None:
    data = _jsonl(tmp_path / "long.jsonl", [json.dumps({"instruction": "short", "output": "x"}),
                                            json.dumps({"instruction": "word " * 200, "output": "x"})])
    line = _fails_with_one_line(capsys, _sft(tmp_path, base, data, "--data.init_args.overlong=error"),
                                "longer than max_seq_length=128: its prompt alone is", tmp_path)
    assert f"{data}:2" in line


def test_zero_usable_examples(base, tmp_path, capsys) -> None:
    data = _jsonl(tmp_path / "long.jsonl", [json.dumps({"instruction": "word " * 200, "output": "x"})] * 3)
    _fails_with_one_line(capsys, _sft(tmp_path, base, data, "--data.init_args.overlong=drop"),
                         f"{data}: no usable training examples (3 of 3 dropped", tmp_path)


def test_unknown_format(base, tmp_path, capsys) -> None:
    data = write_alpaca(tmp_path / "ok.jsonl", 4)
    _fails_with_one_line(capsys, _sft(tmp_path, base, data, "--data.init_args.format=sharegpt"),
                         "unknown format 'sharegpt'", tmp_path)


@pytest.mark.parametrize("option, expected", [
    ("--model.init_args.no_such_option=1", "model: Option 'no_such_option' is not accepted"),
    ("--trainer.max_steps=abc", "trainer.max_steps: Expected a <class 'int'>. Got value: abc"),
    ("--model.init_args.backbone.lora.r=x", "model.backbone.lora.r: Expected a <class 'int'>. Got value: x"),
])
def test_config_key_or_value_the_parser_rejects(option, expected, base, tmp_path, capsys) -> None:
    """The parser's multi-line report (and its 50-line usage) becomes one line naming the key."""
    data = write_alpaca(tmp_path / "ok.jsonl", 4)
    _fails_with_one_line(capsys, _sft(tmp_path, base, data, option), expected, tmp_path)


def test_lora_targets_that_match_nothing(base, tmp_path, capsys) -> None:
    data = write_alpaca(tmp_path / "ok.jsonl", 4)
    _fails_with_one_line(capsys, _sft(tmp_path, base, data, "--model.init_args.backbone.lora.target_modules=[nope_proj]"),
                         "lora.target_modules=['nope_proj']: ", tmp_path)


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
    _fails_with_one_line(capsys, args, f"{data}: no usable training pairs (3 of 3 dropped: 3 identical", tmp_path)


@pytest.mark.parametrize("role, expected", [("policy_adapter", "policy adapter not found"),
                                            ("reward_model", "not a reward model export")])
def test_missing_adapter_directory_for_ppo(role, expected, base, tmp_path, capsys) -> None:
    config = write_config(tmp_path / "ppo.yaml", ppo_config(base, tmp_path / "run", wandb=False))
    missing = tmp_path / "no_such_adapter"
    line = _fails_with_one_line(capsys, ["fit", "--config", str(config), f"--model.init_args.{role}={missing}"],
                                expected, tmp_path)
    assert str(missing) in line


# ------------------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize("option, expected", [
    ("--model.init_args.optimizer.init_args.lr=-0.001", "model.optimizer: Invalid learning rate: -0.001"),
    ("--model.init_args.backbone.lora.r=0", "lora.r must be a positive integer (the adapter's rank), got 0"),
    ("--model.init_args.backbone.lora.alpha=0", "lora.alpha must be > 0"),
    ("--model.init_args.backbone.lora.dropout=1.5", "lora.dropout must be in [0, 1), got 1.5"),
    ("--model.init_args.scheduler.init_args.warmup_steps=-1", "scheduler warmup_steps must be >= 0, got -1"),
])
def test_bad_values_are_named_before_the_model_is_built(option, expected, base, tmp_path, capsys) -> None:
    data = write_alpaca(tmp_path / "ok.jsonl", 4)
    args = _sft(tmp_path, base, data, option)
    if "scheduler" in option:
        args.insert(3, "--model.init_args.scheduler=lit_ft.stages.schedules.WarmupCosine")
    line = _fails_with_one_line(capsys, args, expected, tmp_path)
    assert line.startswith(f"lit-ft: error: {expected}")
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_debug_flag_and_environment_variable_show_the_traceback(base, tmp_path, capsys, monkeypatch) -> None:
    data = write_alpaca(tmp_path / "ok.jsonl", 4)
    args = _sft(tmp_path, base, data, "--model.init_args.optimizer.init_args.lr=-1")
    with pytest.raises(ConfigError, match="Invalid learning rate"):
        main(args + ["--debug"])
    monkeypatch.setenv("LIT_FT_DEBUG", "1")
    with pytest.raises(ConfigError, match="Invalid learning rate"):
        main(args)
    monkeypatch.setenv("LIT_FT_DEBUG", "0")
    _fails_with_one_line(capsys, args, "Invalid learning rate", tmp_path)


# ----------------------------------------------------------------------------------------------- checkpoints
Trained = namedtuple("Trained", "world base data sft rm")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base) -> Trained:
    """Two finished runs of two steps each, through `lit-ft`: SFT and the reward model (their own folders)."""
    world = tmp_path_factory.mktemp("trained")
    data = write_alpaca(world / "train.jsonl", 16)
    main(["fit", "--config", str(write_config(world / "sft.yaml",
                                              sft_config(base, data, world / "sft", max_steps=2, every=2,
                                                         wandb=False)))])
    pairs = world / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) + "\n"
                             for i in range(8)))
    main(["fit", "--config", str(write_config(world / "rm.yaml", _rm_config(base, pairs, world / "rm", 2)))])
    return Trained(world, base, data, world / "sft" / "checkpoints" / "last.ckpt",
                   world / "rm" / "checkpoints" / "last.ckpt")


def _rm_config(base: str, pairs: Path, run_dir: Path, max_steps: int = 1) -> dict:
    config = sft_config(base, pairs, run_dir, max_steps=max_steps, every=2, wandb=False)
    config["model"] = {"class_path": "lit_ft.stages.reward_model.RewardModel",
                       "init_args": {"backbone": dict(config["model"]["init_args"]["backbone"], init_adapter=None),
                                     "export_dir": str(run_dir / "export")}}
    config["data"] = {"class_path": "lit_ft.data.preference.PreferenceDataModule",
                      "init_args": {"source": str(pairs), "val_split_fraction": 0.0, "max_seq_length": 64}}
    return config


def _resume_sft(tmp_path: Path, trained: Trained, checkpoint: Path | str, *overrides: str) -> list[str]:
    """SFT of the trained run's base and data, in its own folder, started from ``checkpoint``."""
    config = sft_config(trained.base, trained.data, tmp_path / "run", max_steps=4, every=2, wandb=False)
    return ["fit", "--config", str(write_config(tmp_path / "sft.yaml", config)), "--ckpt_path", str(checkpoint),
            *overrides]


def _broken_checkpoint(case: str, tmp_path: Path, trained: Trained) -> Path:
    path = tmp_path / f"{case}.ckpt"
    good = trained.sft.read_bytes()
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "corrupt":
        path.write_bytes(good[:100] + bytes(len(good) - 100))
    elif case == "text":
        path.write_text("model: not a checkpoint\n")
    elif case == "folder":
        path = tmp_path / "checkpoints_folder"
        path.mkdir()
    elif case == "adapter":
        path = trained.world / "sft" / "adapter"
    elif case == "weights-only":
        checkpoint = torch.load(trained.sft, weights_only=False)
        torch.save({k: v for k, v in checkpoint.items() if k not in ("optimizer_states", "lr_schedulers")}, path)
    elif case == "missing":
        pass
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "checkpoint not found"), ("empty", "empty file, not a checkpoint"),
    ("truncated", "unreadable checkpoint, truncated or corrupt"), ("corrupt", "unreadable checkpoint"),
    ("text", "unreadable checkpoint"), ("folder", "a folder, not a checkpoint file"),
    ("adapter", "an exported adapter: start a new run from it with model.backbone.init_adapter"),
    ("weights-only", "holds weights only (no optimizer_states, lr_schedulers)"),
])
def test_unusable_checkpoint_file(case, expected, trained, tmp_path, capsys) -> None:
    path = _broken_checkpoint(case, tmp_path, trained)
    line = _fails_with_one_line(capsys, _resume_sft(tmp_path, trained, path), expected, tmp_path,
                                (trained.world,))
    assert line.startswith(f"lit-ft: error: {path}: ")


def test_checkpoint_of_another_stage(trained, tmp_path, capsys) -> None:
    """A reward-model checkpoint into SFT used to end in `KeyError: 'attention_mask'` (LightningCLI swapped the
    model class for the checkpoint's); and the other way round."""
    _fails_with_one_line(capsys, _resume_sft(tmp_path, trained, trained.rm),
                         "cannot resume: stage is 'reward_model' in the checkpoint, 'sft' in the config",
                         tmp_path, (trained.world,))
    pairs = trained.world / "pairs.jsonl"
    config = write_config(tmp_path / "rm.yaml", _rm_config(trained.base, pairs, tmp_path / "run", 4))
    _fails_with_one_line(capsys, ["fit", "--config", str(config), "--ckpt_path", str(trained.sft)],
                         "cannot resume: stage is 'sft' in the checkpoint, 'reward_model' in the config",
                         tmp_path, (trained.world,))


def test_damaged_checkpoint_or_keyword_that_names_none(trained, tmp_path, capsys) -> None:
    checkpoint = torch.load(trained.sft, weights_only=False)
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    _fails_with_one_line(capsys, _resume_sft(tmp_path, trained, tmp_path / "nan.ckpt"),
                         f"cannot resume: tensor {name} holds nan or inf values", tmp_path, (trained.world,))
    _fails_with_one_line(capsys, _resume_sft(tmp_path, trained, "best"),
                         "--ckpt_path best: the best checkpoint is known only inside the process", tmp_path,
                         (trained.world,))


@pytest.mark.parametrize("override, expected", [
    ("--model.init_args.backbone.lora.r=8", "lora.sft.r is 4 in the checkpoint, 8 in the config"),
    ("--model.init_args.backbone.lora.alpha=16", "lora.sft.alpha is 8 in the checkpoint, 16 in the config"),
    ("--model.init_args.backbone.lora.target_modules=[q_proj]", "lora.sft.target_modules is "),
    ("--model.init_args.backbone.lora.adapter_name=renamed", "adapters is ['sft'] in the checkpoint, ['renamed']"),
    ("--data.init_args.max_seq_length=64", "data.max_seq_length is 128 in the checkpoint, 64 in the config"),
    ("--trainer.max_steps=1", "trainer.max_steps=1 is below the checkpoint's step 2"),
])
def test_checkpoint_the_config_does_not_continue(override, expected, trained, tmp_path, capsys) -> None:
    _fails_with_one_line(capsys, _resume_sft(tmp_path, trained, trained.sft, override), expected, tmp_path,
                         (trained.world,))


def test_checkpoint_of_another_base_model_or_data(trained, tmp_path, capsys) -> None:
    other_base = shutil.copytree(trained.base, tmp_path / "other_base")
    _fails_with_one_line(capsys, _resume_sft(tmp_path, trained, trained.sft,
                                             f"--model.init_args.backbone.pretrained={other_base}"),
                         f"base_model is '{Path(trained.base).resolve()}' in the checkpoint, '{other_base}' in the "
                         "config", tmp_path, (trained.world,))
    other_data = write_alpaca(tmp_path / "other.jsonl", 20)
    _fails_with_one_line(capsys, _resume_sft(tmp_path, trained, trained.sft, f"--data.init_args.source={other_data}"),
                         "cannot resume: data.source is ", tmp_path, (trained.world,))


def test_checkpoint_whose_data_file_changed_since(base, tmp_path, capsys) -> None:
    data = write_alpaca(tmp_path / "train.jsonl", 16)
    config = write_config(tmp_path / "sft.yaml", sft_config(base, data, tmp_path / "run", max_steps=2, every=2,
                                                            wandb=False))
    main(["fit", "--config", str(config)])
    capsys.readouterr()
    write_alpaca(data, 17)  # one more record in the same file
    _fails_with_one_line(capsys, ["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps=4"],
                         "cannot resume: data.source.sha256 is ", tmp_path)


# --------------------------------------------------------------------------------------------- output folders
@pytest.mark.parametrize("setting", ["export_dir", "checkpoint_dir"])
def test_output_folder_that_cannot_be_written(setting, base, tmp_path, capsys) -> None:
    """A path under a regular file cannot be created, for root too; found before the model is built."""
    blocker = tmp_path / "run" / "blocker"
    blocker.parent.mkdir()
    blocker.write_text("a file where a folder should be")
    data = write_alpaca(tmp_path / "ok.jsonl", 8)
    config = sft_config(base, data, tmp_path / "run", max_steps=1, wandb=False)
    if setting == "export_dir":
        config["model"]["init_args"]["export_dir"] = str(blocker / "adapter")
        expected = f"model.export_dir ({blocker}): not a directory"
    else:
        config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(blocker / "checkpoints")
        expected = f"ModelCheckpoint.dirpath ({blocker / 'checkpoints'}): not writable"
    args = ["fit", "--config", str(write_config(tmp_path / "sft.yaml", config))]
    _fails_with_one_line(capsys, args, expected, tmp_path)


@pytest.mark.parametrize("target, expected", [
    ("checkpoints", "would replace ModelCheckpoint.dirpath"), ("data", "would replace data.source"),
    ("base", "would replace model.backbone.pretrained"), ("foreign", "holds files that are not an earlier export"),
    ("data-file", "a file, not a folder"),
])
def test_export_folder_that_would_destroy_something(target, expected, base, tmp_path, capsys) -> None:
    """An export replaces its whole folder when training ends: it must not be, or hold, the run's checkpoints,
    data or base model, nor a folder of other files; refused before the model is built."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = write_alpaca(data_dir / "ok.jsonl", 8)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    export = {"checkpoints": tmp_path / "run", "data": data_dir, "base": Path(base).parent,
              "foreign": tmp_path / "notes", "data-file": data}[target]
    args = _sft(tmp_path, base, data, f"--model.init_args.export_dir={export}")
    line = _fails_with_one_line(capsys, args, expected, tmp_path, (Path(base).parent,))
    assert line.startswith(f"lit-ft: error: model.export_dir ({export})")


def test_disk_without_room_for_the_checkpoints(base, tmp_path, capsys, monkeypatch) -> None:
    from lit_ft.callbacks import preflight

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    data = write_alpaca(tmp_path / "ok.jsonl", 8)
    line = _fails_with_one_line(capsys, _sft(tmp_path, base, data), "ModelCheckpoint.dirpath (", tmp_path)
    assert "1.0 MiB free on its disk, the run needs about" in line
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_disk_that_fills_up_during_the_run_keeps_the_last_good_checkpoint(base, tmp_path, capsys) -> None:
    data = write_alpaca(tmp_path / "train.jsonl", 24)
    config = sft_config(base, data, tmp_path / "run", max_steps=6, every=2, wandb=False,
                        plugins=[{"class_path": "tests.tiny_runs.FullDiskAt", "init_args": {"step": 4}}])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    line = _fails_with_one_line(capsys, ["fit", "--config", str(write_config(tmp_path / "sft.yaml", config))],
                                f"{last}: checkpoint not written ({os.strerror(errno.ENOSPC)}); the previous "
                                "last.ckpt is kept", tmp_path)
    assert line.startswith("lit-ft: error: ")
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 2 and RECORD_KEY in checkpoint  # the last good one, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["config.yaml", "last.ckpt"]  # no temporary file left
    assert not (tmp_path / "run" / "adapter").exists()  # the run stopped: nothing exported
