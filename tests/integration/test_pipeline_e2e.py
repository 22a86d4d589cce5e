"""End to end through the command line, as `make pipeline` runs it (slow: about 12 minutes on 2 idle cores)."""

from __future__ import annotations

import json

import pytest

from lit_ft.cli import main
from tests.tiny_models import ROOT


def _fit(config: str, *overrides: str) -> None:
    main(["fit", "--config", str(ROOT / "configs" / config), *overrides])


@pytest.mark.slow
def test_pretrain_sft_rm_ppo_pipeline(tmp_path, monkeypatch, capsys) -> None:
    """The whole embedded pipeline, SFT/pairs/RM/PPO shortened: each stage starts from the previous stage's output,
    SFT lifts held-out exact match, the reward model ranks the SFT policy's held-out pairs better than chance, and
    PPO runs on one base with the SFT policy and the reward model and reports before and after."""
    monkeypatch.chdir(tmp_path)
    _fit("pretrain.yaml")  # the full pre-training: a shorter one leaves a base that SFT cannot teach in minutes
    assert (tmp_path / "artifacts" / "base" / "tiny-mistral" / "config.json").exists()
    capsys.readouterr()  # pre-training's output: its own exact-match line comes first
    _fit("sft.yaml", "--trainer.max_steps=250")
    sft_out = capsys.readouterr().out  # PPO prints an exact-match line of the same shape at its end
    # The SFT policy's judged pairs as `make pairs` writes them, on the first 600 training questions
    for split, more in (("train", ["--max_prompts", "600"]), ("heldout", [])):
        main(["pairs", "--adapter", "artifacts/sft/adapter", "--embedded", split, *more,
              "--out", f"artifacts/pairs/{split}.jsonl"])
    # 1000 of the config's 4800 steps (docs/rlhf.md: 84.8% after 1600)
    _fit("rm.yaml", "--trainer.max_steps=1000", "--trainer.val_check_interval=1000")
    _fit("ppo.yaml", "--trainer.max_steps=40", "--model.init_args.evaluation.num_prompts=60")
    out = sft_out + capsys.readouterr().out
    with capsys.disabled():
        print("\n".join(s for s in out.splitlines() if "exact match" in s or "pairwise accuracy" in s))

    assert list((tmp_path / "runs" / "sft" / "wandb").glob("offline-run-*"))
    line = [s for s in sft_out.splitlines() if s.startswith("held-out exact match  before")][-1]
    before, after = (float(x.split(":")[1].strip().rstrip("%")) for x in line.split("  ->  "))
    assert before <= 5.0 and after >= before + 10.0, line

    assert "reward model: starting from the adapter at artifacts/sft/adapter" in out
    stats = json.loads((tmp_path / "artifacts" / "rm" / "reward_stats.json").read_text())
    heldout = (tmp_path / "artifacts" / "pairs" / "heldout.jsonl").read_text().splitlines()
    assert stats["heldout_pairs"] == len(heldout) > 100  # the 200 held-out questions' judged pairs
    assert stats["heldout_accuracy"] > 0.6  # chance is 0.5 (+-0.03 on 300 pairs); 4800 steps reach 0.93

    assert "ppo: policy from the adapter at artifacts/sft/adapter" in out
    assert "held-out before training, SFT policy (60 prompts, greedy): gold win-rate" in out
    assert "held-out after training, PPO policy (60 prompts, greedy): gold win-rate" in out
    assert (tmp_path / "artifacts" / "ppo" / "policy" / "adapter_model.safetensors").exists()
    assert (tmp_path / "runs" / "ppo" / "checkpoints" / "last.ckpt").exists()
