"""End to end through the command line, as `make sft` runs it (slow: minutes on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pretrain_then_sft_learns_the_embedded_tasks(tmp_path, monkeypatch, capsys) -> None:
    """A shortened `make sft`: pre-train the base, LoRA-SFT it, and check held-out exact match improves."""
    monkeypatch.chdir(tmp_path)
    import wandb

    main(["fit", "--config", str(ROOT / "configs" / "pretrain.yaml"), "--trainer.max_steps=120"])
    assert (tmp_path / "artifacts" / "base" / "tiny-mistral" / "config.json").exists()
    wandb.finish()  # `make sft` runs the stages as separate processes; in one process close the first W&B run
    main(["fit", "--config", str(ROOT / "configs" / "sft.yaml"), "--trainer.max_steps=80"])
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n".join(line for line in out.splitlines() if "exact match" in line))
    assert (tmp_path / "artifacts" / "sft" / "adapter" / "adapter_model.safetensors").exists()
    assert list((tmp_path / "runs" / "sft" / "wandb").glob("offline-run-*"))
    line = next(s for s in out.splitlines() if s.startswith("held-out exact match  before"))
    before, after = (float(x.split(":")[1].strip().rstrip("%")) for x in line.split("  ->  "))
    assert before <= 5.0 and after >= before + 10.0, line
