"""GRPO: what a rollout holds, which passes it makes (none to the reference at beta = 0), what an update changes,
the logged metrics, exact resume, checkpoint spacing, and the configs on local stand-ins."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lit_ft.backbone import Backbone, LoraSettings
from lit_ft.callbacks.evaluation import GenerationTable
from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.prompts import PromptDataModule
from lit_ft.errors import ConfigError
from lit_ft.rl.advantages import group_advantages
from lit_ft.rl.kl import KLLossSettings
from lit_ft.rl.rewards import ExactMatchReward, LengthPenalty
from lit_ft.rl.rollout import SamplingSettings
from lit_ft.stages.grpo import GRPO, GRPOEvaluation, GRPOSettings
from tests.tiny_models import ROOT, StopAt, config_command
from tests.tiny_runs import save_base_and_sft


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tokenizer) -> dict[str, str]:
    """A tiny base and an SFT adapter, as `make sft` leaves them."""
    return save_base_and_sft(tmp_path_factory.mktemp("grpo_stages"), tokenizer)


def _module(stages: dict[str, str], grpo: dict | None = None, kl: dict | None = None,
            evaluation: dict | None = None, **overrides) -> GRPO:
    """The test module; ``grpo``, ``kl`` and ``evaluation`` change single settings of those groups."""
    settings = {
        "backbone": Backbone(pretrained=stages["base"], lora=LoraSettings(r=4, alpha=8, dropout=0.0)),
        "policy_adapter": stages["sft"], "rewards": [ExactMatchReward(), LengthPenalty(0.1)],
        "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-2),
        "sampling": SamplingSettings(temperature=1.0, max_new_tokens=6, seed=3),
        "grpo": GRPOSettings(**{"num_generations": 4, "forward_batch_size": 8, **(grpo or {})}),
        "kl": KLLossSettings(**(kl or {})),
        "evaluation": GRPOEvaluation(**{"num_prompts": 4, "batch_size": 4, **(evaluation or {})})}
    settings.update(overrides)
    return GRPO(**settings)


def _data(prompts_per_batch: int = 4) -> PromptDataModule:
    return PromptDataModule(EmbeddedWorld(num_train=32, num_heldout=4), micro_batch_size=prompts_per_batch)


def _trainer(max_steps: int, **kwargs) -> L.Trainer:
    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "accelerator": "cpu", "limit_val_batches": 0}
    settings.update(kwargs)
    return L.Trainer(max_steps=max_steps, **settings)


def _snapshot(module: GRPO) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class _Rollouts(L.Callback):
    """Keeps the parameters before the first batch, and every rollout the module makes."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.rollouts: list = []

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if not self.before:
            self.before = _snapshot(pl_module)
            rollout = pl_module.rollout

            def recorded(*a, **k):
                r = rollout(*a, **k)
                self.rollouts.append(r)
                return r
            pl_module.rollout = recorded


def test_one_rollout_and_update_changes_the_policy_adapter_only(stages) -> None:
    L.seed_everything(0)
    module = _module(stages, evaluation={"kl": False})
    seen = _Rollouts()
    trainer = _trainer(2, callbacks=[seen])
    trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 2  # two rollout batches, one update each (mu = 1, one minibatch)
    after = _snapshot(module)
    changed = {n for n in after if not torch.equal(after[n], seen.before[n])}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert changed == trainable and all(".policy." in n and "lora_" in n for n in changed), changed ^ trainable
    assert set(module.model.peft_config) == {"policy"}  # beta = 0, no evaluation KL: no reference adapter at all
    r = seen.rollouts[0]
    assert r.response.shape[0] == len(r.query) == 4 * 4 and r.num_groups == 4
    assert r.logprobs is None and r.ref_logprobs is None  # one update per batch, beta = 0: neither pass is made
    assert torch.equal(r.query[0], r.query[3]) and not torch.equal(r.query[3], r.query[4])  # prompt-major rows
    torch.testing.assert_close(r.advantages, group_advantages(r.rewards, 4))
    torch.testing.assert_close(r.rewards, r.reward_parts["exact_match"] + r.reward_parts["length_penalty"])
    logged = trainer.callback_metrics
    for key in ("reward", "reward_group_mean", "reward_group_std", "zero_signal_share", "clipfrac", "kl", "entropy",
                "response_length", "rewards/exact_match/mean", "rewards/length_penalty/mean", "loss"):
        assert f"train/{key}" in logged, key
    assert 0 < float(logged["time/generation_share"]) < 1
    assert float(logged["train/kl"]) == 0.0 and float(logged["train/clipfrac"]) == 0.0  # ratio 1, no reference


def test_beta_zero_makes_no_reference_pass_and_beta_positive_does(stages, monkeypatch) -> None:
    adapters: list = []  # the adapter of every forward pass made inside a training step (not the evaluations)
    original_logits, original_step = GRPO._logits, GRPO.training_step
    inside = []

    def recording(self, *args, adapter="policy"):
        if inside:
            adapters.append(adapter)
        return original_logits(self, *args, adapter=adapter)

    def step(self, *args):
        inside.append(True)
        try:
            return original_step(self, *args)
        finally:
            inside.clear()
    monkeypatch.setattr(GRPO, "_logits", recording)
    monkeypatch.setattr(GRPO, "training_step", step)
    for beta, reference, eval_kl in ((0.0, "adapter", False), (0.0, "adapter", True), (0.1, "adapter", True),
                                     (0.1, "base", False)):
        adapters.clear()
        L.seed_everything(0)
        module = _module(stages, kl={"beta": beta}, reference=reference, grpo={"num_iterations": 2},
                         evaluation={"kl": eval_kl})
        seen = _Rollouts()
        trainer = _trainer(2, callbacks=[seen])
        trainer.fit(module, datamodule=_data())
        r = seen.rollouts[0]
        assert r.logprobs is not None  # two iterations: the old log-probs are taken at sampling time
        # One rollout batch (2 updates = 2 iterations) of 16 responses, 8 per forward pass: old log-probs, then
        # each iteration, 2 passes each.
        assert adapters.count("policy") == 6
        want = {"adapter": "reference", "base": None}[reference]
        # The reference adapter exists only where something reads it: the KL term or the evaluation's KL.
        assert ("reference" in module.model.peft_config) == (reference == "adapter" and (beta > 0 or eval_kl))
        table = next(c for c in trainer.callbacks if isinstance(c, GenerationTable))
        assert ("kl_mean" in table.results["after"]["figures"]) == (beta > 0 or eval_kl)
        if beta == 0:
            assert r.ref_logprobs is None and adapters == ["policy"] * 6, adapters
        else:
            assert r.ref_logprobs is not None and adapters.count(want) == 2, adapters
            assert float(trainer.callback_metrics["train/kl"]) > 0  # the second iteration has moved off it


def test_several_minibatches_and_iterations_count_as_updates(stages) -> None:
    L.seed_everything(0)
    module = _module(stages, grpo={"num_iterations": 2, "minibatch_size": 8, "loss_type": "dapo",
                                   "baseline": "leave_one_out", "scale_rewards": "none"})
    trainer = _trainer(4)
    trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 4  # one rollout batch of 16 responses: 2 iterations x 2 minibatches
    assert "train/clipfrac" in trainer.callback_metrics


def test_settings_are_checked_in_one_line(stages) -> None:
    with pytest.raises(ConfigError, match="needs a reward"):
        GRPO(policy_adapter=None, rewards=[])
    with pytest.raises(ConfigError, match="model.grpo.num_generations must be at least 2"):
        _module(stages, grpo={"num_generations": 1})
    with pytest.raises(ConfigError, match="model.kl.beta must be >= 0"):
        _module(stages, kl={"beta": -0.1})
    with pytest.raises(ConfigError, match="model.grpo.loss_type must be 'grpo', 'dapo' or 'dr_grpo', got 'ppo'"):
        _module(stages, grpo={"loss_type": "ppo"})  # a Literal the command line checks; Python code gets this line


def test_checkpoints_must_fall_between_rollout_batches(stages, tmp_path) -> None:
    module = _module(stages, grpo={"minibatch_size": 8})
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=0)
    with pytest.raises(ConfigError, match="multiple of the 2 optimizer updates"):
        _trainer(4, callbacks=[ckpt], enable_checkpointing=True).fit(module, datamodule=_data())


def _fit(tmp: Path, stages, max_steps: int, stop_at: int | None = None, ckpt_path: str | None = None
         ) -> tuple[GRPO, L.Trainer]:
    L.seed_everything(0)
    module = _module(stages, kl={"beta": 0.05}, grpo={"num_iterations": 2, "minibatch_size": 8},
                     export_dir=str(tmp / "out"))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, every_n_train_steps=4,
                                               save_top_k=0)
    callbacks = [ckpt] + ([StopAt(stop_at)] if stop_at else [])
    trainer = _trainer(max_steps, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, datamodule=_data(), ckpt_path=ckpt_path)
    return module, trainer


def test_resume_from_last_equals_uninterrupted_and_only_lora_trains(stages, tmp_path, capsys) -> None:
    full, _ = _fit(tmp_path / "a", stages, max_steps=12)
    _interrupted, trainer = _fit(tmp_path / "b", stages, max_steps=12, stop_at=8)
    assert trainer.global_step == 8
    resumed, trainer = _fit(tmp_path / "b", stages, max_steps=12, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 12
    want = {n: p for n, p in full.named_parameters() if p.requires_grad}
    got = dict(resumed.named_parameters())
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, atol=1e-6, rtol=0, msg=name)
    # After the fit the LoRA weights moved from the SFT adapter's, and the frozen base did not move at all.
    start = _module(stages)
    start.configure_model()
    initial = dict(start.named_parameters())
    assert any(not torch.equal(initial[n], p) for n, p in want.items())
    frozen = {n: p for n, p in full.named_parameters() if not p.requires_grad and ".reference." not in n}
    assert all(torch.equal(initial[n], p) for n, p in frozen.items() if n in initial) and frozen
    assert (tmp_path / "a" / "out" / "policy" / "adapter_config.json").exists()
    printed = capsys.readouterr().out  # the shared held-out table: the data's gold judge, exact match, the KL
    assert "held-out before training, SFT policy (4 prompts, greedy): gold win-rate" in printed
    assert "held-out after training, GRPO policy (4 prompts, greedy): gold win-rate" in printed
    assert "KL to the reference" in printed


def test_grpo_config_runs_end_to_end_shortened(stages, tmp_path, monkeypatch, capsys) -> None:
    from lit_ft.cli import main

    monkeypatch.chdir(tmp_path)
    main(config_command(ROOT / "configs" / "grpo.yaml") + [
        f"--model.init_args.backbone.pretrained={stages['base']}",
        f"--model.init_args.policy_adapter={stages['sft']}", "--model.init_args.evaluation.num_prompts=4",
        "--model.init_args.grpo.num_generations=2", "--model.init_args.sampling.max_new_tokens=4",
        "--data.source.num_train=32", "--data.source.num_heldout=4", "--data.init_args.micro_batch_size=4",
        "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false"])
    out = capsys.readouterr().out
    assert "grpo: policy from the adapter at" in out and "held-out after training, GRPO policy" in out
    assert (tmp_path / "artifacts" / "grpo" / "policy" / "adapter_model.safetensors").exists()
