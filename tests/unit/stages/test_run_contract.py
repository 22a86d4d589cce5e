"""The contract between a checkpoint and a resumed config: the rules, the tensor check, the checkpoint file, and
the schedule and optimiser settings a resume keeps from the config."""

from __future__ import annotations

import pytest
import torch

from lit_ft.errors import CheckpointError, ConfigError
from lit_ft.stages.run_contract import (
    RECORD_KEY,
    RULES,
    check_run_length,
    check_tensors,
    compare_records,
    data_fields,
    read_checkpoint,
    rule_for,
    run_record,
)
from lit_ft.stages.schedules import WarmupCosine, check_optimizer_settings, optimizer_and_schedule

SAVED = {"version": 1, "stage": "sft", "model_class": "lit_ft.stages.causal_lm.CausalLM", "base_model": "/b",
         "tokenizer": "/b", "adapters": ["sft"], "lora.sft.r": 4, "lora.sft.alpha": 8, "lora.sft.dropout": 0.0,
         "lora.sft.target_modules": ["q_proj"], "data.class_path": "D", "data.source": "/d.jsonl",
         "data.source.sha256": "aa", "data.micro_batch_size": 2, "data.num_workers": 0, "max_steps": 4,
         "settings.export_dir": "/x"}


@pytest.mark.parametrize("field, value", [
    ("stage", "reward_model"), ("model_class", "lit_ft.stages.reward_model.RewardModel"), ("base_model", "/c"),
    ("tokenizer", "/t"), ("adapters", ["renamed"]), ("lora.sft.r", 8), ("lora.sft.alpha", 16),
    ("lora.sft.target_modules", ["q_proj", "v_proj"]), ("data.class_path", "E"), ("data.source", "/e.jsonl"),
    ("data.source.sha256", "bb"),
])
def test_structural_differences_are_refused_naming_field_and_both_values(field, value) -> None:
    current = dict(SAVED, **{field: value})
    with pytest.raises(CheckpointError) as info:
        compare_records(SAVED, current, "run/last.ckpt")
    message = str(info.value)
    assert message.startswith(f"run/last.ckpt: cannot resume: {field} is {SAVED[field]!r} in the checkpoint, "
                              f"{value!r} in the config; ")
    assert "\n" not in message


def test_allowed_differences_are_logged_one_line_each_and_ignored_ones_are_silent() -> None:
    current = dict(SAVED, **{"lora.sft.dropout": 0.1, "data.micro_batch_size": 4, "data.num_workers": 3,
                             "max_steps": 8, "settings.export_dir": "/y"})
    lines = compare_records(SAVED, current, "last.ckpt")
    assert [line.split(":")[2].strip() for line in lines] == [
        "lora.sft.dropout", "data.micro_batch_size", "max_steps", "settings.export_dir"]
    assert all(line.startswith("lit_ft: resume: ") and "\n" not in line for line in lines)
    assert compare_records(SAVED, dict(SAVED), "last.ckpt") == []


def test_a_settings_group_is_recorded_and_compared_setting_by_setting() -> None:
    """PPO's typed groups (sampling, ppo, kl, evaluation) enter the run record one field per setting, so a resume
    with one changed setting logs that setting alone."""
    from lit_ft.rl.kl import AdaptiveKLController, KLRewardSettings
    from lit_ft.rl.rewards import ExactMatchReward
    from lit_ft.stages.ppo import PPO, PPOSettings

    def record(**groups) -> dict:
        module = PPO(policy_adapter=None, reward_model=None, rewards=[ExactMatchReward()], **groups)
        return run_record(module, built=False)

    saved = record(kl=KLRewardSettings(AdaptiveKLController(init_beta=0.1, target=1.0)))
    assert saved["settings.ppo.clip_range"] == 0.2 and saved["settings.sampling.missing_eos_penalty"] == 1.0
    assert saved["settings.kl.controller"] == "AdaptiveKLController(init_beta=0.1, target=1.0, horizon=10000)"
    current = record(kl=KLRewardSettings(AdaptiveKLController(init_beta=0.1, target=1.0)),
                     ppo=PPOSettings(clip_range=0.3))
    assert compare_records(saved, current, "run/last.ckpt") == [
        "lit_ft: resume: settings.ppo.clip_range: checkpoint 0.2, config 0.3 (the config's value is used)"]


def test_first_refusal_in_rule_order_and_data_fields_of_one_side_count() -> None:
    current = dict(SAVED, **{"data.source": "/e.jsonl", "stage": "ppo"})
    with pytest.raises(CheckpointError, match="stage is 'sft'"):
        compare_records(SAVED, current, "c")
    extra = dict(SAVED, **{"data.subset": "x"})  # a data setting the checkpoint did not have
    with pytest.raises(CheckpointError, match="data.subset is '\\(absent\\)' in the checkpoint, 'x' in the config"):
        compare_records(SAVED, extra, "c")
    # validate/test read only the weights: the data and the run length do not matter there
    assert compare_records(SAVED, dict(extra, max_steps=1), "c", fitting=False) == []


def test_every_rule_has_an_action_and_unknown_fields_are_logged() -> None:
    assert all(rule.action in ("refuse", "log", "ignore") for rule in RULES)
    assert rule_for("lora.policy.r").action == "refuse" and rule_for("lora.value.dropout").action == "log"
    assert rule_for("something_new").action == "log"


def test_run_length_below_the_checkpoint_step_is_refused() -> None:
    check_run_length({"global_step": 4}, 4, "c")  # equal: nothing left to train, the run ends (and exports)
    check_run_length({"global_step": 4}, -1, "c")
    with pytest.raises(CheckpointError, match="trainer.max_steps=3 is below the checkpoint's step 4"):
        check_run_length({"global_step": 4}, 3, "c")


def test_tensors_must_match_exactly_never_partially() -> None:
    expected = {"model.lora_A.sft.weight": [4, 8], "model.lora_B.sft.weight": [8, 4]}
    state = {name: torch.zeros(shape) for name, shape in expected.items()}
    check_tensors({"state_dict": state}, expected, "c")
    renamed = {name.replace(".sft.", ".other."): t for name, t in state.items()}
    with pytest.raises(CheckpointError, match="2 of the model's 2 trainable tensors are not in it .*holds 2 the model "
                                              "does not have .*nothing was loaded"):
        check_tensors({"state_dict": renamed}, expected, "c")
    with pytest.raises(CheckpointError, match="not in it"):
        check_tensors({"state_dict": {"model.lora_A.sft.weight": state["model.lora_A.sft.weight"]}}, expected, "c")
    with pytest.raises(CheckpointError, match=r"tensor model.lora_A.sft.weight has shape \[2, 8\] in the checkpoint"):
        check_tensors({"state_dict": dict(state, **{"model.lora_A.sft.weight": torch.zeros(2, 8)})}, expected, "c")


def _good(tmp_path):
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {}, "global_step": 2, "optimizer_states": [], "lr_schedulers": [], "loops": {},
                RECORD_KEY: {"stage": "sft"}}, path)
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "checkpoint not found"), ("empty", "empty file, not a checkpoint"),
    ("truncated", "unreadable checkpoint, truncated or corrupt"), ("garbage", "unreadable checkpoint"),
    ("folder", "a folder, not a checkpoint file"), ("adapter", "an exported adapter"),
    ("not-lightning", "not a Lightning training checkpoint"), ("weights-only", "holds weights only"),
])
def test_checkpoint_file_faults_are_one_line(case, expected, tmp_path) -> None:
    good = _good(tmp_path)
    path = tmp_path / f"{case}.ckpt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif case in ("folder", "adapter"):
        path.mkdir()
        if case == "adapter":
            (path / "adapter_config.json").write_text("{}")
    elif case == "not-lightning":
        torch.save({"weights": torch.zeros(2)}, path)
    elif case == "weights-only":
        torch.save({"state_dict": {}, "global_step": 2}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value) and "\n" not in str(info.value)
    assert read_checkpoint(good)["global_step"] == 2
    if case == "weights-only":
        assert read_checkpoint(path, fitting=False)["global_step"] == 2  # validate/test need only the weights


class _Data:
    def __init__(self, source: str):
        self.hparams = {"source": source, "micro_batch_size": 2, "_instantiator": "x"}


def test_data_fingerprint_follows_the_file_content_and_where_it_is(tmp_path, monkeypatch) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    first = data_fields(_Data(str(data)))
    assert first["data.source"] == str(data.resolve()) and len(first["data.source.sha256"]) == 64
    assert "data._instantiator" not in first
    monkeypatch.chdir(tmp_path)
    assert data_fields(_Data("train.jsonl")) == first  # a relative path to the same file is the same source
    data.write_text('{"instruction": "a", "output": "c"}\n')
    assert data_fields(_Data(str(data)))["data.source.sha256"] != first["data.source.sha256"]
    assert data_fields(_Data("org/hub-dataset"))["data.source"] == "org/hub-dataset"


# --------------------------------------------------------------------------------- schedule and optimiser
def _resume(saved: dict, lr: float = 1e-2, weight_decay: float = 0.0, total: int = 8) -> tuple:
    params = [torch.nn.Parameter(torch.zeros(2))]
    result = optimizer_and_schedule(params, lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=weight_decay),
                                    WarmupCosine, total)
    optimizer, scheduler = result["optimizer"], result["lr_scheduler"]["scheduler"]
    optimizer.load_state_dict(saved["optimizer"])  # the order Lightning restores them in
    scheduler.load_state_dict(saved["scheduler"])
    return optimizer, scheduler


def _train(steps: int, total: int, lr: float = 1e-2) -> dict:
    params = [torch.nn.Parameter(torch.ones(2))]
    result = optimizer_and_schedule(params, lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
                                    WarmupCosine, total)
    optimizer, scheduler = result["optimizer"], result["lr_scheduler"]["scheduler"]
    for _ in range(steps):
        params[0].grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "lr": optimizer.param_groups[0]["lr"]}


def test_resume_keeps_the_config_horizon_and_recomputes_the_current_lr(capsys) -> None:
    finished = _train(steps=4, total=4)
    assert finished["lr"] == 0.0  # the 4-step schedule ends at zero
    optimizer, scheduler = _resume(finished, total=8)
    reference = _train(steps=4, total=8)
    assert scheduler.total_steps == 8 and scheduler.last_epoch == 4
    assert optimizer.param_groups[0]["lr"] == reference["lr"] > 0  # the 8-step schedule's LR at step 4
    assert "exp_avg" in optimizer.state_dict()["state"][0]  # the Adam moments come from the checkpoint
    unchanged = _resume(reference, total=8)[0]
    assert unchanged.param_groups[0]["lr"] == reference["lr"]  # nothing changed: bit-identical
    assert capsys.readouterr().out == ""


def test_resume_takes_the_optimizer_settings_from_the_config_and_says_so(capsys) -> None:
    saved = _train(steps=2, total=8)
    optimizer, _ = _resume(saved, lr=2e-2, weight_decay=0.1)
    group = optimizer.param_groups[0]
    assert group["initial_lr"] == 2e-2 and group["weight_decay"] == 0.1
    assert group["lr"] == pytest.approx(2 * saved["lr"])  # same step of the same schedule, twice the peak
    out = capsys.readouterr().out.strip().splitlines()
    want = "optimizer settings from the config, not the checkpoint: weight_decay 0.0 -> 0.1, lr (peak) 0.01 -> 0.02"
    assert out == [f"lit_ft: resume: {want}"], out


@pytest.mark.parametrize("optimizer, scheduler, expected", [
    (lambda p: torch.optim.AdamW(p, lr=-1e-3), WarmupCosine, "model.optimizer: Invalid learning rate: -0.001"),
    (lambda p: torch.optim.AdamW(p, betas=(2.0, 0.9)), WarmupCosine, "model.optimizer: Invalid beta parameter"),
    (torch.optim.AdamW, lambda o: WarmupCosine(o, warmup_steps=-1), "scheduler warmup_steps must be >= 0"),
    (torch.optim.AdamW, lambda o: WarmupCosine(o, min_lr_ratio=2.0), "scheduler min_lr_ratio must be in [0, 1]"),
    (torch.optim.AdamW, lambda o: WarmupCosine(o, total_steps=0), "scheduler total_steps must be >= 1"),
])
def test_bad_optimizer_and_scheduler_settings_fail_before_the_model_is_built(optimizer, scheduler, expected) -> None:
    with pytest.raises(ConfigError) as info:
        check_optimizer_settings(optimizer, scheduler)
    assert str(info.value).startswith(expected)
