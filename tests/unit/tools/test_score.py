"""`lit-ft score`: the reward model's base loads as it was trained (NF4 with bf16 compute for a QLoRA reward model),
and a reward model exported from a training checkpoint (`lit-ft export --checkpoint`) is one that `score` takes."""

from __future__ import annotations

import json

import pytest
import torch

from lit_ft.backbone import Backbone, build_model, save_full_model
from lit_ft.cli import main as lit_ft
from lit_ft.stages.reward_model import HEAD_FILE, STATS_FILE, init_score_head, write_reward_files
from lit_ft.tools import score
from tests.quantised_loading import LoadedBases, assert_nf4_bf16, save_nf4_adapter
from tests.tiny_models import TINY
from tests.unit.stages.test_reward_model import _fit

PAIR = ["--prompt", "What is 3 + 4?", "--response", "7", "--response", "8"]
SCORE_MAIN = score.main


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer) -> str:
    torch.manual_seed(0)
    model = build_model(Backbone(pretrained=None, tiny=TINY, lora=None), tokenizer)
    return str(save_full_model(model, tmp_path_factory.mktemp("score_base") / "tiny", tokenizer))


def _scores(monkeypatch, args: list[str]) -> list[float]:
    """Run `lit-ft score` (the real command) and return the raw rewards it computed."""
    rewards: list[list[float]] = []
    monkeypatch.setattr(score, "main", lambda argv: rewards.append(SCORE_MAIN(argv)))
    lit_ft(["score", *args])
    return rewards[-1]


def test_a_4bit_reward_model_loads_its_base_as_nf4_with_bf16_compute(tiny_base, tokenizer, tmp_path, monkeypatch,
                                                                        capsys) -> None:
    export = save_nf4_adapter(tmp_path / "rm", tiny_base, tokenizer, prompt_format="chat")
    torch.manual_seed(3)
    head = init_score_head(torch.nn.Linear(TINY.hidden_size, 1)).state_dict()
    write_reward_files(export, head, {"mean": 0.0, "std": 1.0, "adapter_name": "sft", "base_model": tiny_base,
                                      "prompt_format": "chat", "chat_template": "builtin"})
    loaded = LoadedBases(monkeypatch)
    rewards = _scores(monkeypatch, ["--adapter", str(export), *PAIR])
    assert_nf4_bf16(loaded)
    captured = capsys.readouterr()
    assert "loaded as NF4 with bfloat16 compute" in captured.err and "chat prompts" in captured.out
    assert len(rewards) == 2 and rewards[0] != rewards[1]


def test_export_of_a_reward_model_checkpoint_is_a_reward_model_score_takes(tiny_base, tmp_path, monkeypatch,
                                                                            capsys) -> None:
    _fit(tmp_path, tiny_base, max_steps=2)
    exported = tmp_path / "exported"
    lit_ft(["export", "--checkpoint", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(exported)])
    assert f"reward model of {tmp_path / 'ckpt' / 'last.ckpt'}" in capsys.readouterr().out
    assert {HEAD_FILE, STATS_FILE, "lit_ft_base.json", "adapter_config.json"} <= {p.name for p in exported.iterdir()}
    stats = json.loads((exported / STATS_FILE).read_text())
    assert stats["prompt_format"] == "alpaca" and stats["adapter_name"] == "reward" and stats["global_step"] == 2
    from_checkpoint = _scores(monkeypatch, ["--adapter", str(exported), *PAIR])
    from_training = _scores(monkeypatch, ["--adapter", str(tmp_path / "rm"), *PAIR])  # the run's own export
    assert from_checkpoint == pytest.approx(from_training, abs=1e-5)
