"""W&B settings by credentials: an account holder gets W&B's own terminal lines (the run URL), console capture and
system charts; without credentials the run is offline and quiet in the terminal, and keeps its system metrics."""

from __future__ import annotations

import os

import pytest

from lit_ft.loggers import wandb_logger
from lit_ft.loggers.wandb_logger import WandbLogger


@pytest.fixture(autouse=True)
def no_wandb_env(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_SILENT", "WANDB_CONSOLE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_with_credentials_the_run_is_online_with_wandbs_own_lines_and_system_charts(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(wandb_logger, "wandb_credentials_available", lambda: True)
    logger = WandbLogger(save_dir=str(tmp_path), settings=None)  # the CLI passes every wandb.init argument
    assert logger._offline is False
    assert logger._wandb_init.get("settings") is None  # W&B's defaults: run URL printed, console and stats on
    assert "WANDB_SILENT" not in os.environ


def test_without_credentials_the_run_is_offline_quiet_and_keeps_system_metrics(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(wandb_logger, "wandb_credentials_available", lambda: False)
    logger = WandbLogger(save_dir=str(tmp_path), settings=None)
    settings = logger._wandb_init["settings"]
    assert logger._offline is True
    assert settings.silent is True and settings.console == "off"
    assert settings.x_disable_stats is False  # `wandb sync` later uploads the GPU/CPU charts too
    assert "WANDB_SILENT" not in os.environ  # nothing process-wide that a later online run would inherit


def test_wandb_mode_and_explicit_settings_win(tmp_path, monkeypatch) -> None:
    import wandb

    monkeypatch.setattr(wandb_logger, "wandb_credentials_available", lambda: True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert WandbLogger(save_dir=str(tmp_path))._offline is True
    mine = wandb.Settings(console="wrap")
    assert WandbLogger(save_dir=str(tmp_path), offline=True, settings=mine)._wandb_init["settings"] is mine
