"""The training progress bar: its description, and that the CLI gives every run one unless the bar is off."""

from __future__ import annotations

import pytest

from lit_ft.callbacks.progress import StepProgressBar, train_description
from lit_ft.cli import LitFtCLI
from tests.tiny_models import ROOT
from tests.tiny_runs import save_tiny_base


def test_the_description_names_only_the_bounds_a_run_has() -> None:
    assert train_description(3, -1, 120, 500) == "Epoch 3 · step 120/500"  # Lightning's bar: "Epoch 3/-2"
    assert train_description(3, 10, 120, -1) == "Epoch 3/9"
    assert train_description(0, None, 0, None) == "Epoch 0"
    assert train_description(2, 5, 40, 80) == "Epoch 2/4 · step 40/80"


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("progress_base") / "tiny", tokenizer)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_cli_uses_the_step_bar_unless_the_bar_is_off(enabled: bool, base: str, tmp_path) -> None:
    args = ["--config", str(ROOT / "configs" / "sft.yaml"), "--model.init_args.backbone.pretrained", base,
            "--run.dir", str(tmp_path / "run"), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", str(enabled).lower()]
    trainer = LitFtCLI(args=args, run=False).trainer
    bars = [c for c in trainer.callbacks if isinstance(c, StepProgressBar)]
    assert len(bars) == (1 if enabled else 0)
    assert (trainer.progress_bar_callback is bars[0]) if enabled else trainer.progress_bar_callback is None


def test_a_configured_progress_bar_is_kept(base: str, tmp_path) -> None:
    from lightning.pytorch.callbacks import TQDMProgressBar

    args = ["--config", str(ROOT / "configs" / "sft.yaml"), "--model.init_args.backbone.pretrained", base,
            "--run.dir", str(tmp_path / "run"), "--trainer.logger", "false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
    trainer = LitFtCLI(args=args, run=False).trainer
    assert isinstance(trainer.progress_bar_callback, TQDMProgressBar)
    assert not any(isinstance(c, StepProgressBar) for c in trainer.callbacks)
