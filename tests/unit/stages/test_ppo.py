"""PPO: prompts, sampling with left padding, one base for four roles, reference log-probs, what an update
changes, exact resume, and the recipe on local stand-ins."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_ft.backbone import Backbone, LoraSettings
from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.prompts import LeftPadCollator, PromptDataModule
from lit_ft.metrics import per_task_counts
from lit_ft.padding import position_ids_from_mask
from lit_ft.rl.kl import AdaptiveKLController, KLRewardSettings
from lit_ft.rl.rewards import ExactMatchReward
from lit_ft.rl.rollout import SamplingSettings, response_hidden, response_logits, sample, top_p_filter
from lit_ft.stages.ppo import PPO, PPOSettings, normalised_head_state
from lit_ft.stages.reward_model import RewardModel
from lit_ft.stages.rollout_stage import EvaluationSettings
from tests.tiny_models import (
    ROOT,
    StopAt,
    config_command,
)
from tests.tiny_runs import perturb_lora, save_base_and_sft

# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def stages(tmp_path_factory, tokenizer) -> dict[str, str]:
    """A tiny base, an SFT adapter and a reward-model export, as `make sft` and `make rm` leave them."""
    root = tmp_path_factory.mktemp("ppo_stages")
    paths = save_base_and_sft(root, tokenizer)
    base = paths["base"]
    rm = RewardModel(Backbone(pretrained=base, lora=LoraSettings(r=4, alpha=8, dropout=0.0, adapter_name="reward")))
    rm.configure_model()
    perturb_lora(rm.model, "reward", 2)
    rm.reward_mean.fill_(0.5)
    rm.reward_std.fill_(2.0)
    rm.export(str(root / "rm"))
    return {**paths, "rm": str(root / "rm")}


def _module(stages: dict[str, str], **overrides) -> PPO:
    settings = {
        "backbone": Backbone(pretrained=stages["base"], lora=LoraSettings(r=4, alpha=8, dropout=0.0)),
        "policy_adapter": stages["sft"], "reward_model": stages["rm"], "rewards": [ExactMatchReward()],
        "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-2),
        "sampling": SamplingSettings(max_new_tokens=6, missing_eos_penalty=1.0, seed=3),
        "ppo": PPOSettings(epochs=2, minibatch_size=4, forward_batch_size=2),
        "evaluation": EvaluationSettings(num_prompts=4, batch_size=4)}
    settings.update(overrides)
    return PPO(**settings)


def _data() -> PromptDataModule:
    return PromptDataModule(EmbeddedWorld(num_train=32, num_heldout=4), micro_batch_size=8)


def test_value_head_from_the_reward_head_predicts_the_normalised_score() -> None:
    torch.manual_seed(0)
    reward = torch.nn.Linear(8, 1)
    value = torch.nn.Linear(8, 1)
    value.load_state_dict(normalised_head_state(reward, {"mean": 0.7, "std": 3.0}))
    x = torch.randn(5, 8)
    torch.testing.assert_close(value(x), (reward(x) - 0.7) / 3.0)


def test_per_task_counts() -> None:
    counts = per_task_counts([True, False, True, True], ["sort", "add", "add", None])
    assert counts == {"add": (1, 2), "sort": (1, 1)} and list(counts) == ["add", "sort"]
    assert per_task_counts([True], [None]) == {}


# ----------------------------------------------------------------------------------------------- sampling
def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert torch.isfinite(top_p_filter(logits, 0.1)).sum() == 1


def test_sampling_with_left_padding_matches_each_prompt_alone(stages, tokenizer) -> None:
    module = _module(stages)
    module.configure_model()
    module.model.eval()
    prompts = [[1, 22557, 28723], [1, 415, 2936, 9060, 285, 22557, 28723]]
    batch = LeftPadCollator(0)([{"input_ids": torch.tensor(p), "index": i} for i, p in enumerate(prompts)])
    together = sample(module.model, batch["input_ids"], batch["attention_mask"], 5, 2, 0, greedy=True)
    for row, prompt in enumerate(prompts):
        alone = sample(module.model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), 5, 2, 0,
                       greedy=True)
        n = int(alone.mask.sum())
        assert together.tokens[row, :n].tolist() == alone.tokens[0, :n].tolist()
        # The scoring pass (no cache, whole sequence) gives the same greedy choices as the cached sampler.
        hidden = response_hidden(module.model, batch["input_ids"][row:row + 1], batch["attention_mask"][row:row + 1],
                                 together.tokens[row:row + 1], together.mask[row:row + 1])
        greedy = response_logits(module.model, hidden).argmax(-1)[0, :n]
        assert greedy.tolist() == together.tokens[row, :n].tolist()
    assert position_ids_from_mask(batch["attention_mask"])[0].tolist() == [0, 0, 0, 0, 0, 1, 2]


# ----------------------------------------------------------------------------------------- roles, updates
def test_one_base_holds_all_four_roles(stages, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    module = _module(stages, reference="adapter")
    module.configure_model()
    assert set(module.model.peft_config) == {"policy", "value", "reward", "reference"}
    base_numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(stages["base"]).parameters())
    non_lora = [p for n, p in module.model.named_parameters() if "lora_" not in n]
    assert sum(p.numel() for p in non_lora) == base_numel  # the base weights exist once
    all_params = [p for p in module.parameters()]
    assert len({p.data_ptr() for p in all_params}) == len(all_params)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n or ".value." in n or n.startswith("value_head.") for n in trainable)
    assert module.model.active_adapter == "policy"


def test_reference_logprobs_equal_the_base_model_without_adapters(stages, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    module = _module(stages)
    module.configure_model()
    module.model.eval()
    base = AutoModelForCausalLM.from_pretrained(stages["base"]).eval()
    query = torch.tensor([[0, 0, 1, 22557, 28723], [1, 415, 2936, 9060, 285]])
    query_mask = (query != 0).long()
    response = torch.tensor([[330, 2, 0], [28705, 28740, 2]])
    response_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with torch.no_grad():
        ref = module._logits(query, query_mask, response, response_mask, adapter=None)
        policy = module._logits(query, query_mask, response, response_mask)
        ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
        expected = base(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    expected = expected[:, query.shape[1] - 1:-1]
    real = response_mask.bool()
    torch.testing.assert_close(ref[real], expected[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(policy[real], expected[real], atol=1e-3)  # the SFT adapter does change the model


def _snapshot(module: PPO) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_one_rollout_and_update_changes_only_policy_and_value(stages, tmp_path) -> None:
    L.seed_everything(0)
    module = _module(stages)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    snapshots = {}

    class Before(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args) -> None:
            snapshots["before"] = _snapshot(pl_module)

    trainer.callbacks.append(Before())
    trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 4  # one rollout batch: 2 epochs x 2 minibatches
    after = _snapshot(module)
    changed = {n for n in after if not torch.equal(after[n], snapshots["before"][n])}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert changed == trainable, changed ^ trainable
    assert any(".policy." in n for n in changed) and any(".value." in n for n in changed)
    assert any(n.startswith("value_head.") for n in changed)
    logged = trainer.callback_metrics  # the metrics, and the sampled tokens the throughput callback misses
    for key in ("score", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_variance",
                "response_length", "eos_rate"):
        assert f"train/{key}" in logged, key
    assert 0 < float(logged["time/generation_share"]) < 1
    assert float(logged["throughput/response_tokens_per_s"]) > 0


def _fit(tmp: Path, stages, max_steps: int, stop_at: int | None = None, ckpt_path: str | None = None,
         **overrides) -> tuple[PPO, L.Trainer]:
    L.seed_everything(0)
    module = _module(stages, kl=KLRewardSettings(AdaptiveKLController(init_beta=0.1, target=1.0, horizon=100)),
                     export_dir=str(tmp / "out"), **overrides)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, every_n_train_steps=4,
                                               save_top_k=0)
    callbacks = [ckpt] + ([StopAt(stop_at)] if stop_at else [])
    trainer = L.Trainer(max_steps=max_steps, logger=False, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(module, datamodule=_data(), ckpt_path=ckpt_path)
    return module, trainer


def test_resume_from_last_equals_uninterrupted(stages, tmp_path, capsys) -> None:
    full, _ = _fit(tmp_path / "a", stages, max_steps=12)
    _interrupted, trainer = _fit(tmp_path / "b", stages, max_steps=12, stop_at=8)
    assert trainer.global_step == 8
    resumed, trainer = _fit(tmp_path / "b", stages, max_steps=12, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 12
    assert resumed.kl_controller.beta == pytest.approx(full.kl_controller.beta, rel=1e-9)
    assert full.kl_controller.beta != 0.1  # the adaptive controller moved, and resumed to the same value
    want = {n: p for n, p in full.named_parameters() if p.requires_grad}
    got = dict(resumed.named_parameters())
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, atol=1e-6, rtol=0, msg=name)
    assert (tmp_path / "a" / "out" / "policy" / "adapter_config.json").exists()
    assert (tmp_path / "a" / "out" / "value" / "value_head.safetensors").exists()
    printed = capsys.readouterr().out
    assert "held-out before training, SFT policy (4 prompts, greedy): gold win-rate" in printed
    assert "mean reward-model score" in printed


def test_checkpoints_must_fall_between_rollout_batches(stages, tmp_path) -> None:
    from lit_ft.errors import ConfigError

    module = _module(stages)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=0)
    trainer = L.Trainer(max_steps=4, logger=False, callbacks=[ckpt], enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    with pytest.raises(ConfigError, match="multiple of the 4 optimizer updates"):
        trainer.fit(module, datamodule=_data())


def test_missing_policy_adapter_is_one_clear_error(stages, tmp_path) -> None:
    from lit_ft.backbone import BackboneError

    module = _module(stages, policy_adapter=str(tmp_path / "nope"))
    with pytest.raises(BackboneError, match="policy adapter not found"):
        module.configure_model()


def test_a_value_init_outside_its_choices_is_one_line() -> None:
    from lit_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="^model.value_init must be 'reward' or 'fresh', got 'warm'$"):
        PPO(policy_adapter=None, reward_model=None, rewards=[ExactMatchReward()], value_init="warm")
    with pytest.raises(ConfigError, match="^model.kl.estimator must be 'k1' or 'k3', got 'k2'$"):
        KLRewardSettings(estimator="k2")


# ---------------------------------------------------------------------------------------- configs, recipe
def test_ppo_config_runs_end_to_end_shortened(stages, tmp_path, monkeypatch, capsys) -> None:
    from lit_ft.cli import main

    monkeypatch.chdir(tmp_path)
    main(config_command(ROOT / "configs" / "ppo.yaml") + [
        f"--model.init_args.backbone.pretrained={stages['base']}",
        f"--model.init_args.policy_adapter={stages['sft']}", f"--model.init_args.reward_model={stages['rm']}",
        "--model.init_args.evaluation.num_prompts=4", "--data.source.num_train=32", "--data.source.num_heldout=4",
        "--data.init_args.micro_batch_size=16", "--trainer.max_steps=4", "--trainer.logger=false",
        "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"])
    out = capsys.readouterr().out
    assert "ppo: policy from the adapter at" in out and "held-out after training, PPO policy" in out
    assert (tmp_path / "artifacts" / "ppo" / "policy" / "adapter_model.safetensors").exists()


def test_7b_ppo_recipe_code_path_runs_on_local_stand_ins(stages, tmp_path, monkeypatch, capsys) -> None:
    """configs/mistral7b_qlora_ppo.yaml with the model, data and run length swapped: nf4 base shared by the
    four roles, gradient checkpointing, bf16 autocast, HH prompts, adaptive KL."""
    from lit_ft.cli import main

    monkeypatch.chdir(tmp_path)
    rows = [{"chosen": f"\n\nHuman: What is {i} + 1?\n\nAssistant: {i + 1}.",
             "rejected": f"\n\nHuman: What is {i} + 1?\n\nAssistant: No."} for i in range(24)]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(config_command(ROOT / "configs" / "mistral7b_qlora_ppo.yaml") + [
        f"--model.init_args.backbone.pretrained={stages['base']}",
        f"--model.init_args.policy_adapter={stages['sft']}", f"--model.init_args.reward_model={stages['rm']}",
        "--model.init_args.optimizer=torch.optim.AdamW", "--model.init_args.sampling.max_new_tokens=4",
        "--model.init_args.evaluation.num_prompts=2", "--model.init_args.evaluation.batch_size=2",
        f"--data.init_args.source={data}", "--data.init_args.val_source=null",
        "--data.init_args.val_split_fraction=0.25", "--data.init_args.micro_batch_size=4",
        "--data.init_args.num_workers=0", "--trainer.max_steps=8"])
    out = capsys.readouterr().out
    assert "held-out after training, PPO policy (2 prompts, greedy): mean reward-model score" in out, out[-2000:]
    assert list((tmp_path / "runs" / "mistral7b_qlora_ppo" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "artifacts" / "mistral7b_qlora_ppo" / "policy" / "adapter_config.json").exists()


# ------------------------------------------------------------------------------------ gold reward, evaluation
class _SpyGold:
    """A gold reward that varies per response (so that it would change the updates if it entered the reward) and
    records what it was asked to judge."""

    name = "gold"
    top_score = 30.0

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, prompts, responses) -> torch.Tensor:
        self.calls.append(list(responses))
        return torch.tensor([10.0 * len(r) for r in responses])


def _one_batch(stages, **overrides) -> tuple[PPO, L.Trainer]:
    L.seed_everything(0)
    module = _module(stages, **overrides)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(module, datamodule=_data())
    return module, trainer


def test_gold_reward_is_logged_and_never_enters_the_reward(stages) -> None:
    plain, plain_trainer = _one_batch(stages)
    gold = _SpyGold()
    judged, trainer = _one_batch(stages, gold_reward=gold)
    # the rollout's responses were judged and logged (the held-out evaluation uses the data's own judge)
    assert len(gold.calls) == 1 and len(gold.calls[0]) == 8
    logged = trainer.callback_metrics
    assert float(logged["gold/score"]) == pytest.approx(sum(10.0 * len(t) for t in gold.calls[0]) / 8)
    assert "gold/win_rate" in logged and "gold/score" not in plain_trainer.callback_metrics
    # the trained reward is the same with and without the gold reward: same score, same updates
    assert float(logged["train/score"]) == float(plain_trainer.callback_metrics["train/score"])
    want = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    got = dict(judged.named_parameters())
    for name, p in want.items():
        assert torch.equal(got[name], p), name


def test_evaluation_reports_gold_exact_match_reward_model_and_kl(stages, capsys) -> None:
    """PPO's held-out evaluation is the shared callback, given PPO's roles: the gold judge of the data, exact
    match, the reward model's own scorer and the KL to the SFT adapter."""
    from lit_ft.callbacks.evaluation import GenerationTable

    module, trainer = _one_batch(stages, reference="adapter")
    table = next(c for c in trainer.callbacks if isinstance(c, GenerationTable))
    assert table.num_scored == 4 and table.batch_size == 4 and table.max_new_tokens == 6  # PPO's own settings
    before, after = table.results["before"]["figures"], table.results["after"]["figures"]
    for figures in (before, after):
        for key in ("gold_win_rate", "exact_match", "reward_model_score", "kl_mean", "kl_max", "gold_score"):
            assert key in figures, key
        assert figures["gold_win_rate"] <= figures["exact_match"]
        assert any(key.startswith("exact_match/") for key in figures)
    assert before["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference before training
    assert after["kl_max"] >= after["kl_mean"] > 0
    # the score is the reward model's own scorer, normalised: the same number PPO's rollouts are scored with
    query = torch.tensor([[1, 5, 6]])
    response, mask = torch.tensor([[7, 2]]), torch.ones(1, 2, dtype=torch.long)
    ids, full = torch.cat([query, response], 1), torch.ones(1, 5, dtype=torch.long)
    assert float(module.reward_model_scores(query, torch.ones_like(query), response, mask)) == pytest.approx(
        float(module.reward_scorer(ids, full, normalize=True)))
    out = capsys.readouterr().out
    assert "held-out after training, PPO policy (4 prompts, greedy): gold win-rate" in out
    assert "SFT policy" in out and "PPO policy" in out
    assert "KL to the reference, max (nats)" in out


def test_no_heldout_prompt_in_reward_model_or_ppo_training_data(tokenizer) -> None:
    """The reward model's pairs (the questions `make pairs` samples the SFT policy on, and the generated pairs DPO
    reads) and PPO's prompts (as configs/ppo.yaml makes them) never ask a held-out question; the held-out evaluation
    asks exactly the held-out questions. (lit_ft.data.preference.JudgedPairs refuses a held-out file that shares a
    prompt with its training file: tests/unit/data/test_preference.py.)"""
    from lit_ft.data.embedded import PairSettings, PromptSettings
    from lit_ft.data.formats import format_alpaca_prompt
    from lit_ft.data.synthetic import split_facts
    from lit_ft.tools.pairs import embedded_rows

    _, heldout = split_facts(1234, 2000, 200)
    held = {f.question for f in heldout}
    sampled_on = {r["instruction"] for r in embedded_rows("train", 4000)[0]}  # as the Makefile runs lit-ft pairs
    assert len(sampled_on) > 5000 and not held & sampled_on
    assert {r["instruction"] for r in embedded_rows("heldout", 0)[0]} == held
    pairs = EmbeddedWorld(pairs=PairSettings(extra_facts=4000)).splits("preference")
    assert not held & {r["instruction"] for r in pairs.train}
    assert {r["instruction"] for r in pairs.val} == held
    for settings in (PromptSettings(), PromptSettings(tasks=["add", "sort"], balance_tasks=True),
                     PromptSettings(tasks=["add", "successor", "count", "max", "sort"], balance_tasks=True)):
        dm = PromptDataModule(EmbeddedWorld(prompts=settings))
        dm.connect(tokenizer)
        dm.setup("fit")
        held_prompts = {format_alpaca_prompt(q) for q in held}
        assert {item.prompt.text for item in dm.heldout()} == held_prompts
        assert not {p.text for p in dm.train_prompts} & held_prompts
