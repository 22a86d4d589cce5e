"""DPO: one base for policy and reference, chosen and rejected in one forward (packed or padded) summed over
response tokens, the loss at step 0, the precomputed reference cache, what a fit changes, exact resume with the
cache, the config and the warnings."""

from __future__ import annotations

import logging
import math

import lightning as L
import pytest
import torch

from lit_ft.backbone import Backbone, LoraSettings
from lit_ft.callbacks.evaluation import GenerationTable
from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.preference import DPODataModule, PackedPairCollator, PaddedPairCollator, pair_values
from lit_ft.errors import ConfigError
from lit_ft.stages.dpo import DPO
from tests.tiny_models import ROOT, StopAt, config_command
from tests.tiny_runs import save_base_and_sft


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tokenizer) -> dict[str, str]:
    """A tiny base and an SFT adapter, as `make sft` leaves them."""
    return save_base_and_sft(tmp_path_factory.mktemp("dpo_stages"), tokenizer)


def _module(stages: dict[str, str], **overrides) -> DPO:
    settings = {"backbone": Backbone(pretrained=stages["base"], lora=LoraSettings(r=4, alpha=8, dropout=0.0)),
                "policy_adapter": stages["sft"], "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-2),
                "num_eval": 4, "eval_batch_size": 4, "max_new_tokens": 6}
    settings.update(overrides)
    return DPO(**settings)


def _data(packing: bool = True, micro_batch_size: int = 4) -> DPODataModule:
    return DPODataModule(EmbeddedWorld(num_train=16, num_heldout=4), max_seq_length=128, packing=packing,
                         micro_batch_size=micro_batch_size)


def _connected(module: DPO, packing: bool = True) -> DPODataModule:
    dm = _data(packing)
    dm.connect(module.tokenizer)
    dm.setup("fit")
    return dm


def _batch(dm: DPODataModule, rows: list[int]) -> dict[str, torch.Tensor]:
    return dm.collator()([dm.train_dataset[i] for i in rows])


def test_dpo_held_out_prompts_carry_their_questions_answers(tokenizer) -> None:
    from lit_ft.data.gold import gold_rank
    from lit_ft.data.preference import PreferenceDataModule

    dm = DPODataModule(EmbeddedWorld(num_train=16, num_heldout=4), max_seq_length=128)
    dm.connect(tokenizer)
    items = dm.heldout()
    assert dm.checkable and len(items) == 4
    for item in items:  # the reference is the answer the gold judge ranks correct
        assert item.reference and item.prompt.reference == item.reference
        assert gold_rank(item.prompt.text, item.reference) == 1
    rm = PreferenceDataModule(EmbeddedWorld(num_train=16, num_heldout=4), max_seq_length=128)
    rm.connect(tokenizer)
    assert not rm.checkable and [i.prompt.input_ids for i in rm.heldout()] == [i.prompt.input_ids for i in items]


# ------------------------------------------------------------------------------------------- roles, forwards
def test_one_base_holds_policy_and_reference(stages) -> None:
    from transformers import AutoModelForCausalLM

    module = _module(stages)
    module.configure_model()
    assert set(module.model.peft_config) == {"policy", "reference"}
    base_numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(stages["base"]).parameters())
    non_lora = [p for n, p in module.model.named_parameters() if "lora_" not in n]
    assert sum(p.numel() for p in non_lora) == base_numel  # the base weights exist once
    params = list(module.parameters())
    assert len({p.data_ptr() for p in params}) == len(params)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n for n in trainable)
    assert module.model.active_adapter == "policy"


def test_packed_and_padded_pairs_give_each_sides_response_logps_alone(stages) -> None:
    module = _module(stages)
    module.configure_model()
    module.model.eval()
    packed_dm, padded_dm = _connected(module, True), _connected(module, False)
    rows = [0, 3, 5]
    packed, padded = _batch(packed_dm, rows), _batch(padded_dm, rows)
    assert packed["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 6
    with torch.no_grad():
        got_packed, len_packed = module.pair_logps(packed)
        got_padded, len_padded = module.pair_logps(padded)
        dataset = packed_dm.train_dataset
        for b, i in enumerate(rows):  # each side alone, summed over its response tokens only
            item = dataset[i]
            for side, key in enumerate(("chosen_input_ids", "rejected_input_ids")):
                ids = item[key][None]
                logits = module.model(input_ids=ids).logits.float().log_softmax(-1)
                start = item["prompt_length"]
                want = logits[0, start - 1:-1].gather(-1, ids[0, start:, None]).sum()
                torch.testing.assert_close(got_packed[b, side], want, atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(got_padded[b, side], want, atol=1e-4, rtol=1e-5)
                assert int(len_packed[b, side]) == int(len_padded[b, side]) == ids.shape[1] - start
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # no compute spent on padding


def test_pair_values_reads_either_layout_as_chosen_rejected() -> None:
    padded = {"index": torch.tensor([0, 1])}
    assert pair_values(torch.tensor([1.0, 2.0, 3.0, 4.0]), padded).tolist() == [[1.0, 3.0], [2.0, 4.0]]
    packed = {"real_segments": torch.tensor([True, True, True, True, False])}
    assert pair_values(torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0]), packed).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert PackedPairCollator(0) and PaddedPairCollator(0)


def test_at_step_0_the_policy_is_the_reference_and_the_dpo_loss_is_log_2(stages) -> None:
    module = _module(stages)
    module.configure_model()
    dm = _connected(module)
    loss, metrics = module.loss_and_metrics(_batch(dm, [0, 1, 2, 3]), cached=False)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"}


def test_reference_base_is_the_model_without_adapters_and_warns(stages, caplog) -> None:
    from transformers import AutoModelForCausalLM

    with caplog.at_level(logging.WARNING, logger="lit_ft"):
        module = _module(stages, reference="base")
        module.configure_model()
    assert "reference: base is the base with adapters disabled" in caplog.text
    assert set(module.model.peft_config) == {"policy"}
    dm = _connected(module, packing=False)
    batch = _batch(dm, [0, 1])
    base = AutoModelForCausalLM.from_pretrained(stages["base"]).eval()
    with torch.no_grad():
        ref = module.reference_logps(batch, cached=False)
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    from lit_ft.losses.preference import sequence_logps

    want = pair_values(sequence_logps(logits, batch["labels"])[0], batch)
    torch.testing.assert_close(ref, want, atol=1e-4, rtol=1e-5)


def test_simpo_needs_no_reference_forward(stages) -> None:
    module = _module(stages, loss_type="simpo", beta=2.0)
    module.configure_model()
    dm = _connected(module)
    assert module.reference_logps(_batch(dm, [0, 1])) is None
    loss, metrics = module.loss_and_metrics(_batch(dm, [0, 1]))
    assert torch.isfinite(loss) and "rewards/margins" in metrics


def test_settings_are_checked_in_one_line(stages) -> None:
    with pytest.raises(ConfigError, match="loss_type: 'dpo' is not one of"):
        _module(stages, loss_type="dpo")
    with pytest.raises(ConfigError, match="reference must be 'base' or 'adapter'"):
        _module(stages, reference="sft")
    with pytest.raises(ConfigError, match="reference: adapter needs"):
        _module(stages, policy_adapter=None)


def test_the_precomputed_cache_equals_the_live_reference(stages) -> None:
    module = _module(stages)
    module.configure_model()
    with torch.no_grad():
        for name, p in module.model.named_parameters():  # move the policy, so the reference is not the policy
            if "lora_B.policy." in name:
                p.add_(0.1)
    dm = _connected(module)
    cache = module.compute_reference_cache(dm.train_dataset, dm.collator(), batch_size=3)
    assert cache.shape == (len(dm.train_dataset), 2)
    batch = _batch(dm, [7, 2, 11, 0])
    live = module.reference_logps(batch, cached=False)
    module.ref_cache = cache
    torch.testing.assert_close(module.reference_logps(batch), live, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(module.pair_logps(batch)[0].detach(), live, atol=1e-3)


# ------------------------------------------------------------------------------------------- fit, resume
def _fit(tmp_path, stages, max_steps: int, stop_at: int | None = None, ckpt_path: str | None = None, **settings):
    L.seed_everything(7)
    module = _module(stages, export_dir=str(tmp_path / "out"), precompute_ref_log_probs=True, **settings)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2,
                                               save_top_k=0)
    callbacks = [ckpt] + ([StopAt(stop_at)] if stop_at else [])
    trainer = L.Trainer(max_steps=max_steps, logger=False, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(module, datamodule=_data(), ckpt_path=ckpt_path)
    return module, trainer


def test_a_fit_moves_the_policy_only_and_prints_the_before_after_table(stages, tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    module, trainer = _fit(tmp_path, stages, max_steps=4)
    sft = load_file(f"{stages['sft']}/adapter_model.safetensors")
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sft.keys() == out.keys() and any(not torch.equal(sft[k], out[k]) for k in sft)  # LoRA changed
    reference = {n: p for n, p in module.model.named_parameters() if ".reference." in n}
    for name, p in reference.items():  # the reference is the SFT adapter, untouched
        torch.testing.assert_close(p, sft[name.replace(".reference.", ".")], msg=name)
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(stages["base"]).named_parameters())
    for name, p in module.model.named_parameters():  # the frozen base did not change
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[key]), name
    printed = capsys.readouterr().out
    assert "reference log-probs of 48 pairs precomputed" in printed
    assert "SFT policy | sigmoid policy" in printed and "KL to the reference, mean" in printed
    assert "gold win-rate" in printed and "exact match" in printed  # the questions carry their answers
    table = next(c for c in trainer.callbacks if isinstance(c, GenerationTable))  # DPO's configure_callbacks
    before, after = table.results["before"]["figures"], table.results["after"]["figures"]
    assert before["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at step 0
    assert {"exact_match", "gold_win_rate", "kl_max"} <= set(after) and after["kl_mean"] > 0


def test_resume_with_the_cache_equals_uninterrupted(stages, tmp_path, capsys) -> None:
    full, _ = _fit(tmp_path / "a", stages, max_steps=6)
    _fit(tmp_path / "b", stages, max_steps=6, stop_at=4)
    ckpt = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["dpo"]["ref_cache"].shape == (48, 2)
    capsys.readouterr()
    resumed, trainer = _fit(tmp_path / "b", stages, max_steps=6, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 6
    printed = capsys.readouterr().out
    assert "reference log-probs of 48 pairs from the checkpoint" in printed and "precomputed" not in printed
    torch.testing.assert_close(resumed.ref_cache, full.ref_cache, atol=0, rtol=0)
    got = dict(resumed.named_parameters())
    for name, p in full.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p, atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------- config
def test_dpo_config_runs_end_to_end_shortened(stages, tmp_path, monkeypatch, capsys) -> None:
    from lit_ft.cli import main

    monkeypatch.chdir(tmp_path)
    main(config_command(ROOT / "configs" / "dpo.yaml") + [
        f"--model.init_args.backbone.pretrained={stages['base']}", f"--model.init_args.policy_adapter={stages['sft']}",
        "--model.init_args.num_eval=4", "--data.source.num_train=16", "--data.source.num_heldout=4",
        "--data.init_args.micro_batch_size=4", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"])
    out = capsys.readouterr().out
    assert "dpo: policy from the adapter at" in out and "| sigmoid policy" in out and "gold win-rate" in out
    assert (tmp_path / "artifacts" / "dpo" / "adapter" / "adapter_model.safetensors").exists()
