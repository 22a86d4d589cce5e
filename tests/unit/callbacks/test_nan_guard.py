"""NaN or infinite loss: the run stops with one line naming the step and the last good checkpoint (which stays
intact), or, with `max_skipped_steps`, skips such steps without touching the weights, up to that limit. SFT
(automatic optimisation) and PPO (manual optimisation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_ft.cli import LitFtCLI, main
from tests.tiny_runs import ppo_config, save_tiny_base, sft_config, write_alpaca, write_config


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("nan_base") / "tiny", tokenizer)


def _callbacks(poison_steps: list[int], max_skipped: int, target: str = "lora_B") -> list[dict]:
    return [{"class_path": "lit_ft.callbacks.nan_guard.NonFiniteGuard", "init_args": {"max_skipped_steps": max_skipped}},
            {"class_path": "tests.tiny_runs.PoisonAt", "init_args": {"steps": poison_steps, "target": target}}]


def _sft_args(tmp_path: Path, base: str, poison_steps: list[int], max_skipped: int) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_alpaca(tmp_path / "train.jsonl", 24)
    config = sft_config(base, data, tmp_path / "run", max_steps=6, every=2, wandb=False,
                        callbacks=_callbacks(poison_steps, max_skipped))
    return ["fit", "--config", str(write_config(tmp_path / "sft.yaml", config))]


def _assert_stopped(capsys, args: list[str], expected: str, checkpoint: Path, step: int) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"lit-ft: error: {expected}; last good checkpoint: {checkpoint} (step {step})"), errors[0]
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == step
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_sft_stops_at_the_first_nan_naming_step_and_last_good_checkpoint(base, tmp_path, capsys) -> None:
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _assert_stopped(capsys, _sft_args(tmp_path, base, [3], max_skipped=0),
                    "non-finite loss (nan) at step 4: training stopped", checkpoint, 2)
    assert not (tmp_path / "run" / "adapter").exists()  # nothing exported from a failed run


def test_sft_skips_nan_steps_up_to_the_limit(base, tmp_path, capsys) -> None:
    cli = LitFtCLI(args=_sft_args(tmp_path / "skip", base, [1, 3], max_skipped=2))
    poison = next(c for c in cli.trainer.callbacks if type(c).__name__ == "PoisonAt")
    guard = next(c for c in cli.trainer.callbacks if type(c).__name__ == "NonFiniteGuard")
    assert cli.trainer.global_step == 6 and guard.skipped_steps == 2
    assert poison.changed == [False, False]  # a skipped step leaves every weight and optimiser moment alone
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())

    checkpoint = tmp_path / "limit" / "run" / "checkpoints" / "last.ckpt"
    _assert_stopped(capsys, _sft_args(tmp_path / "limit", base, [1, 3], max_skipped=1),
                    "non-finite loss (nan) at step 4 after skipping 1 steps: training stopped", checkpoint, 2)


def test_ppo_stops_on_nan_with_manual_optimisation(base, tmp_path, capsys) -> None:
    config = ppo_config(base, tmp_path / "run", max_steps=12, every=4, wandb=False,
                        callbacks=_callbacks([4], 0, target="value_head.weight"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _assert_stopped(capsys, ["fit", "--config", str(write_config(tmp_path / "ppo.yaml", config))],
                    "non-finite loss (nan) at step 5: training stopped", checkpoint, 4)
