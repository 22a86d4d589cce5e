"""The reward model: losses, head, last-token reading, one forward pass, training, export/load, resume, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_ft.backbone import Backbone, LoraSettings, add_adapter, save_full_model
from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.preference import PreferenceCollator, PreferenceDataModule
from lit_ft.losses.reward import (
    PairMetrics,
    center_rewards_loss,
    pairwise_accuracy,
    pairwise_loss,
    reward_loss,
)
from lit_ft.padding import last_token_index
from lit_ft.stages.reward_model import RewardModel, init_score_head, load_reward_model
from tests.tiny_models import (
    ROOT,
    TINY,
    StopAt,
    config_command,
)

HH_FILE = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_test.jsonl.gz"


# ------------------------------------------------------------------------------------------ losses, metrics
def test_pairwise_loss_and_margin_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(x) = log(1 + exp(-x)); differences 1 and -1.
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # With margins 0 and 0.5 the differences become 1 and -1.5.
    margin = torch.tensor([0.0, 0.5])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.5))) / 2
    assert pairwise_loss(chosen, rejected, margin).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.0073375, rel=1e-6)


def test_center_rewards_term_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert center_rewards_loss(chosen, rejected).item() == pytest.approx((3.0**2 + 1.0**2) / 2)
    total = reward_loss(chosen, rejected, torch.tensor([0.0, 0.5]), center_rewards_coefficient=0.01)
    assert total.item() == pytest.approx(1.0073375 + 0.01 * 5.0, rel=1e-6)
    assert reward_loss(chosen, rejected).item() == pytest.approx(pairwise_loss(chosen, rejected).item())


def test_accuracy_counts_ties_as_wrong_and_metrics_accumulate() -> None:
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])).item() == 0.5
    metrics = PairMetrics()
    c1, r1 = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])
    c2, r2 = torch.tensor([4.0]), torch.tensor([1.0])
    metrics.update(c1, r1, pairwise_loss(c1, r1))
    metrics.update(c2, r2, pairwise_loss(c2, r2))
    out = metrics.compute()
    everything = torch.tensor([1.0, 2.0, 0.0, 3.0, 4.0, 1.0], dtype=torch.float64)
    assert out["pairs"] == 3 and out["accuracy"] == pytest.approx(2 / 3)
    assert out["reward_gap"] == pytest.approx((1 - 1 + 3) / 3)
    assert out["reward_mean"] == pytest.approx(everything.mean().item())
    assert out["reward_std"] == pytest.approx(everything.std().item())
    assert out["loss"] == pytest.approx(pairwise_loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 3.0, 1.0])).item())


def test_score_head_init() -> None:
    torch.manual_seed(0)
    head = init_score_head(torch.nn.Linear(4095, 1))
    assert head.weight.std().item() == pytest.approx(1 / 64, rel=0.05)
    assert head.weight.mean().abs().item() < 1e-3 and torch.equal(head.bias, torch.zeros(1))


def test_last_token_index_for_both_paddings() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 0, 4]


# -------------------------------------------------------------------------------------------- the module
def _tiny_rm(**kwargs) -> RewardModel:
    torch.manual_seed(0)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, adapter_name="reward")
    return RewardModel(backbone=Backbone(pretrained=None, tiny=TINY, lora=lora), **kwargs)


def _pairs(tokenizer, n: int = 3) -> list[dict]:
    dm = PreferenceDataModule(EmbeddedWorld(num_train=16, num_heldout=4))
    dm.connect(tokenizer)
    dm.setup("fit")
    items = [dm.train_dataset[i] for i in range(n)]
    items[0]["chosen_input_ids"] = items[0]["chosen_input_ids"][:30]  # lengths differ: real padding
    return items


def test_default_adapter_name_and_head_on_module() -> None:
    module = RewardModel(backbone=Backbone(pretrained=None, tiny=TINY, lora=LoraSettings(r=4)))
    assert module.adapter_name == "reward"  # LoraSettings' generic "default" becomes "reward"
    module.configure_model()
    assert module.score_head.in_features == TINY.hidden_size and torch.equal(module.score_head.bias, torch.zeros(1))
    assert module.model.active_adapter == "reward"


def test_reward_is_read_at_the_last_real_token_with_left_or_right_padding(tokenizer) -> None:
    module = _tiny_rm()
    module.configure_model()
    module.eval()
    items = _pairs(tokenizer)
    with torch.no_grad():
        right = module(PreferenceCollator(0, "right")(items))
        left = module(PreferenceCollator(0, "left")(items))
        torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
        # Each equals the unpadded sequence's head(h[-1]).
        decoder = module.model.get_base_model().get_decoder()
        for row, ids in enumerate([it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]):
            hidden = decoder(input_ids=ids[None]).last_hidden_state[0, -1]
            torch.testing.assert_close(right[row], module.score_head(hidden)[0], atol=1e-5, rtol=1e-5)


def test_chosen_and_rejected_share_one_forward_pass(tokenizer) -> None:
    module = _tiny_rm()
    module.configure_model()
    calls = []
    decoder = module.model.get_base_model().get_decoder()
    decoder.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                  with_kwargs=True)
    batch = PreferenceCollator(0)(_pairs(tokenizer))
    loss = module.training_step(batch, 0)  # logging without a trainer only warns
    assert len(calls) == 1 and calls[0][0] == 6 and loss.requires_grad


# ------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer) -> str:
    from lit_ft.backbone import build_model

    torch.manual_seed(0)
    model = build_model(Backbone(pretrained=None, tiny=TINY, lora=None), tokenizer)
    return str(save_full_model(model, tmp_path_factory.mktemp("rm_base") / "tiny", tokenizer))


class Snapshot(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _fit(tmp: Path, base: str, max_steps: int, ckpt_path: str | None = None, quantization: str = "none",
         stop_at: int | None = None, val_every: int | None = None) -> tuple[RewardModel, L.Trainer]:
    L.seed_everything(7)
    backbone = Backbone(pretrained=base, quantization=quantization, compute_dtype="float32",
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0, adapter_name="reward"))
    module = RewardModel(backbone=backbone, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                         center_rewards_coefficient=0.01, export_dir=str(tmp / "rm"))
    data = PreferenceDataModule(EmbeddedWorld(num_train=48, num_heldout=8), max_seq_length=128, micro_batch_size=4)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, every_n_train_steps=2,
                                               save_top_k=0)
    callbacks = [ckpt, Snapshot()] + ([StopAt(stop_at)] if stop_at else [])
    trainer = L.Trainer(max_steps=max_steps, logger=False, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                        val_check_interval=val_every or max_steps, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def test_fit_trains_adapter_and_head_only_and_exports(tmp_path, tiny_base, capsys) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_before = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    module, trainer = _fit(tmp_path, tiny_base, max_steps=3)
    init = next(c for c in trainer.callbacks if isinstance(c, Snapshot)).params
    changed, base_checked = 0, 0
    for name, p in module.named_parameters():
        if "lora_" in name or name.startswith("score_head."):
            changed += int(not torch.equal(p, init[name]))
        else:
            key = name.replace("model.base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), base_before[key]), f"frozen base parameter {key} changed"
            base_checked += 1
    assert changed == sum("lora_" in n or n.startswith("score_head.") for n in init) and base_checked > 10
    # Validation ran at the last step: its reward statistics are the buffers, the checkpoint and the export.
    assert module.heldout["pairs"] == 24  # 8 facts x 3 gold pair kinds
    assert module.reward_std.item() > 0 and module.reward_mean.item() != 0
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert {"score_head.weight", "score_head.bias", "reward_mean", "reward_std"} <= keys
    assert all("lora_" in k for k in keys - {"score_head.weight", "score_head.bias", "reward_mean", "reward_std"})
    trainer.save_checkpoint(tmp_path / "after_validation.ckpt")  # `last` was written at step 2, before it
    saved = torch.load(tmp_path / "after_validation.ckpt", weights_only=False)["state_dict"]
    assert saved["reward_mean"].item() == pytest.approx(module.reward_mean.item())
    out = tmp_path / "rm"
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["mean"] == pytest.approx(module.reward_mean.item()) and stats["std"] == pytest.approx(
        module.reward_std.item())
    assert (stats["adapter_name"], stats["base_model"], stats["prompt_format"]) == ("reward", tiny_base, "alpaca")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    torch.testing.assert_close(load_file(out / "score_head.safetensors")["weight"], module.score_head.weight.detach())
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy: " in printed and "(24 pairs)" in printed


def test_export_loads_back_onto_a_shared_base_with_identical_scores(tmp_path, tiny_base, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    module, _ = _fit(tmp_path, tiny_base, max_steps=2)
    module.eval()
    batch = PreferenceCollator(0, "left")(_pairs(tokenizer))
    with torch.no_grad():
        expected = module(batch)
    # A base that already carries a trainable "policy" adapter, active (as in PPO).
    base = add_adapter(AutoModelForCausalLM.from_pretrained(tiny_base), LoraSettings(r=2, adapter_name="policy"))
    policy_trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    scorer = load_reward_model(base, tmp_path / "rm")
    assert scorer.model is base and set(base.peft_config) == {"policy", "reward"}
    assert base.active_adapter == "policy"
    assert {n for n, p in base.named_parameters() if p.requires_grad} == policy_trainable
    base.eval()
    with torch.no_grad():
        got = scorer(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        normalised = scorer(batch["input_ids"], batch["attention_mask"], normalize=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalised, (expected - module.reward_mean) / module.reward_std, atol=1e-4, rtol=1e-4)
    assert base.active_adapter == "policy" and {n for n, p in base.named_parameters() if p.requires_grad} == (
        policy_trainable)
    # And onto a plain model.
    plain = load_reward_model(AutoModelForCausalLM.from_pretrained(tiny_base).eval(), tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(plain(batch["input_ids"], batch["attention_mask"]), expected, atol=1e-5,
                                   rtol=1e-5)
    assert not any(p.requires_grad for p in plain.parameters())


def test_resume_from_last_equals_uninterrupted(tmp_path, tiny_base) -> None:
    full, _ = _fit(tmp_path / "a", tiny_base, max_steps=6, val_every=4)
    _, interrupted = _fit(tmp_path / "b", tiny_base, max_steps=6, stop_at=4, val_every=4)
    assert interrupted.global_step == 4
    resumed, trainer = _fit(tmp_path / "b", tiny_base, max_steps=6, ckpt_path="last", val_every=4)
    assert trainer.global_step == 6
    a = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        if p.requires_grad:
            assert (p - a[name]).abs().max() <= 1e-6, name
    assert resumed.reward_mean.item() == pytest.approx(full.reward_mean.item(), abs=1e-5)


def test_nf4_backbone_trains_on_cpu(tmp_path, tiny_base) -> None:
    import bitsandbytes as bnb

    module, trainer = _fit(tmp_path, tiny_base, max_steps=2, quantization="nf4")
    assert trainer.global_step == 2
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())
    assert (tmp_path / "rm" / "score_head.safetensors").exists()


# -------------------------------------------------------------------------------------- command line, configs
def test_score_cli_on_a_tiny_export(tmp_path, tiny_base, capsys) -> None:
    from lit_ft.cli import main

    _fit(tmp_path, tiny_base, max_steps=2)
    capsys.readouterr()
    rewards = []
    from lit_ft.tools import score

    original = score.main
    try:
        score.main = lambda argv: rewards.append(original(argv))
        main(["score", "--adapter", str(tmp_path / "rm"), "--prompt", "What is 3 + 4?", "--response", "7",
              "--response", "8"])
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"instruction": "What is 3 + 4?", "response": "7"}) + "\n"
                        + json.dumps({"prompt": "What is 3 + 4?", "response": "8"}) + "\n")
        main(["score", "--adapter", str(tmp_path / "rm"), "--file", str(rows)])
    finally:
        score.main = original
    out = capsys.readouterr().out
    assert "alpaca prompts" in out and "normalised" in out and "What is 3 + 4?" in out
    assert len(rewards[0]) == 2 and rewards[0] == pytest.approx(rewards[1], abs=1e-5)
    assert f"{rewards[0][0]:.3f}" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--adapter", str(tmp_path / "nothing"), "--prompt", "p", "--response", "r"])
    assert exit_info.value.code == 2 and "not a reward model export" in capsys.readouterr().err


def test_rm_config_runs_from_the_sft_adapter_or_the_base(tmp_path, monkeypatch, tiny_base, capsys) -> None:
    """configs/rm.yaml as `make rm` runs it, shortened: falls back to the base when there is no SFT adapter."""
    from lit_ft.cli import main
    from lit_ft.data.embedded import EmbeddedWorld

    monkeypatch.chdir(tmp_path)
    splits = EmbeddedWorld(num_train=32, num_heldout=8).splits("preference")  # where `make pairs` writes its pairs
    (tmp_path / "artifacts" / "pairs").mkdir(parents=True)
    for name, records in (("train", splits.train), ("heldout", splits.val)):
        (tmp_path / "artifacts" / "pairs" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = config_command(ROOT / "configs" / "rm.yaml") + [
        f"--model.init_args.backbone.pretrained={tiny_base}", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.logger=false", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false"]
    main(args)
    out = capsys.readouterr().out
    assert "reward model: no adapter at artifacts/sft/adapter: starting from the base model" in out
    assert "held-out pairwise accuracy:" in out and f"({len(splits.val)} pairs)" in out
    assert (tmp_path / "artifacts" / "rm" / "reward_stats.json").exists()
    # With an SFT adapter in place it starts from it (its r=16 comes along).
    sft = tmp_path / "artifacts" / "sft" / "adapter"
    sft.parent.mkdir(parents=True)
    (tmp_path / "artifacts" / "rm").rename(sft)
    main(args)
    out = capsys.readouterr().out
    assert "reward model: starting from the adapter at artifacts/sft/adapter" in out


def test_7b_rm_recipe_code_path_runs_on_local_stand_ins(tmp_path, monkeypatch, tiny_base, capsys) -> None:
    """configs/mistral7b_qlora_rm_hh.yaml with only the model, data and run length swapped: nf4, LoRA on all
    linear layers, HH transcripts, gradient checkpointing, bf16 autocast, reward export."""
    import gzip

    from lit_ft.cli import main

    monkeypatch.chdir(tmp_path)
    if HH_FILE.exists():
        with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
            records = [json.loads(next(f)) for _ in range(24)]
    else:
        records = [{"chosen": f"\n\nHuman: What is {i} + 1?\n\nAssistant: {i + 1}.",
                    "rejected": f"\n\nHuman: What is {i} + 1?\n\nAssistant: I won't say."} for i in range(24)]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = config_command(ROOT / "configs" / "mistral7b_qlora_rm_hh.yaml")
    overrides = [
        f"--model.init_args.backbone.pretrained={tiny_base}",
        "--model.init_args.optimizer=torch.optim.AdamW",  # paged AdamW needs CUDA
        f"--data.init_args.source={data}",
        "--data.init_args.val_source=null",
        "--data.init_args.val_split_fraction=0.25",
        "--data.init_args.max_seq_length=256",
        "--data.init_args.num_workers=0",
        "--data.init_args.micro_batch_size=2",
        "--trainer.max_steps=2",
        "--trainer.accumulate_grad_batches=2",
        "--trainer.val_check_interval=4",
    ]
    main(recipe + overrides)
    out = capsys.readouterr().out
    export = tmp_path / "artifacts" / "mistral7b_qlora_rm_hh"
    assert (export / "adapter_config.json").exists(), out[-2000:]
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"] == tiny_base
    targets = {name.split(".")[-1] for name in config["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    stats = json.loads((export / "reward_stats.json").read_text())
    assert stats["prompt_format"] == "chat" and stats["adapter_name"] == "reward" and stats["heldout_pairs"] == 6
    assert "pairs from 18 records" in out and "held-out pairwise accuracy:" in out
    assert list((tmp_path / "runs" / "mistral7b_qlora_rm_hh" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "runs" / "mistral7b_qlora_rm_hh" / "checkpoints" / "last.ckpt").exists()


def test_init_adapter_null_on_the_command_line_means_the_base_model() -> None:
    from lit_ft.cli import LitFtCLI

    cli = LitFtCLI(args=["--config", str(ROOT / "configs" / "rm.yaml"), "--model.backbone.init_adapter", "null",
                         "--trainer.logger", "false"], run=False)
    assert cli.model.backbone.init_adapter is None
