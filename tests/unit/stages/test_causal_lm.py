"""The causal-LM module: token-normalised loss across gradient accumulation, frozen base, checkpoints, export."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_ft.backbone import Backbone, LoraSettings, save_full_model
from lit_ft.data.embedded import EmbeddedWorld
from lit_ft.data.instruction import InstructionDataModule
from lit_ft.data.packing import ExampleStore, PackedCollator, PackedDataset
from lit_ft.stages.causal_lm import CausalLM
from tests.tiny_models import TINY, StopAt, tiny_backbone


def _constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _sgd_zero(params):
    return torch.optim.SGD(params, lr=0.0)


class GradCapture(CausalLM):
    """Records the gradients the optimizer would apply (after the module's token normalisation)."""

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.captured = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def _examples(tokenizer_len: int = 32000) -> list[dict]:
    """Eight examples whose supervised counts differ a lot (1 to 20 tokens)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for prompt_len, answer_len in [(5, 1), (3, 20), (9, 2), (4, 7), (6, 3), (2, 15), (8, 1), (5, 9)]:
        ids = torch.randint(3, tokenizer_len, (prompt_len + answer_len,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return out


def _initial_state(backbone: Backbone, lora: bool) -> dict:
    module = CausalLM(backbone=backbone)
    module.configure_model()
    g = torch.Generator().manual_seed(3)
    # A non-zero LoRA B, so that every LoRA matrix gets a gradient (B starts at zero in PEFT).
    return {
        k: (torch.randn(v.shape, generator=g) * 0.05 if lora and "lora_B" in k else v.clone())
        for k, v in module.model.state_dict().items()
    }


def _grads(backbone: Backbone, batches: list[dict], accumulate: int, state: dict) -> dict:
    module = GradCapture(backbone=backbone, optimizer=_sgd_zero, scheduler=_constant)
    module.configure_model()
    module.model.load_state_dict(state)
    trainer = L.Trainer(
        max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
        gradient_clip_val=None,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return module.captured


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradient_accumulation_normalises_by_supervised_tokens(lora: bool) -> None:
    examples = _examples()
    collate = PackedCollator(pad_token_id=0)
    one_row_each = PackedDataset(ExampleStore(examples), [[i] for i in range(len(examples))])
    # Four micro-batches of unequal supervised counts ...
    micro = [collate([one_row_each[i], one_row_each[i + 1]]) for i in range(0, 8, 2)]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    assert len(set(counts)) == 4, counts
    # ... against one batch holding the same eight examples.
    whole = [collate([one_row_each[i] for i in range(8)])]
    backbone = tiny_backbone(lora=lora)
    state = _initial_state(backbone, lora)
    grads_acc = _grads(backbone, micro, accumulate=4, state=state)
    grads_one = _grads(backbone, whole, accumulate=1, state=state)
    assert grads_acc.keys() == grads_one.keys() and grads_acc
    for name, g in grads_one.items():
        rel = (grads_acc[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer) -> str:
    """A tiny randomly initialised Mistral base saved like `make pretrain` saves the embedded one."""
    from lit_ft.backbone import build_model

    torch.manual_seed(0)
    spec = Backbone(pretrained=None, tiny=TINY, lora=None)
    model = build_model(spec, tokenizer)
    return str(save_full_model(model, tmp_path_factory.mktemp("base") / "tiny", tokenizer))


class Snapshot(L.Callback):
    """Parameters as they are when training starts (after configure_model and any checkpoint restore)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.params = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def _fit(tmp: Path, base: str, max_steps: int, ckpt_path: str | None = None, quantization: str = "none",
         every: int = 2, stop_at: int | None = None) -> tuple[CausalLM, L.Trainer]:
    L.seed_everything(7)
    backbone = Backbone(
        pretrained=base, quantization=quantization, compute_dtype="float32",
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, adapter_name="sft"),
    )
    module = CausalLM(backbone=backbone, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), export_dir=str(tmp / "adapter"))
    data = InstructionDataModule(EmbeddedWorld(num_train=64, num_heldout=8), max_seq_length=128, micro_batch_size=2)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, every_n_train_steps=every, save_top_k=0)
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, callbacks=[ckpt, Snapshot()] + ([StopAt(stop_at)] if stop_at else []), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def test_fit_changes_lora_only_and_checkpoint_is_adapter_sized(tmp_path, tiny_base) -> None:
    from transformers import AutoModelForCausalLM

    base_before = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    module, trainer = _fit(tmp_path, tiny_base, max_steps=3)
    init = next(c for c in trainer.callbacks if isinstance(c, Snapshot)).params
    changed_lora, base_checked = 0, 0
    for name, p in module.model.named_parameters():
        if "lora_" in name:
            changed_lora += int(not torch.equal(p, init[name]))
        else:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), base_before[key]), f"frozen base parameter {key} changed"
            base_checked += 1
    assert changed_lora == sum("lora_" in n for n in init) and base_checked > 10
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert "optimizer_states" in ckpt and ckpt["lr_schedulers"]


def test_exported_adapter_loads_with_peft(tmp_path, tiny_base) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module, _ = _fit(tmp_path, tiny_base, max_steps=2)
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(adapter)).eval()
    ids = torch.randint(3, 32000, (1, 12))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.model(input_ids=ids).logits)


def test_resume_from_last_equals_uninterrupted(tmp_path, tiny_base) -> None:
    full, _ = _fit(tmp_path / "a", tiny_base, max_steps=6)
    _, interrupted = _fit(tmp_path / "b", tiny_base, max_steps=6, stop_at=4)
    assert interrupted.global_step == 4
    resumed, trainer = _fit(tmp_path / "b", tiny_base, max_steps=6, ckpt_path="last")
    assert trainer.global_step == 6
    a = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert (p - a[name]).abs().max() <= 1e-6, name


def test_nf4_backbone_trains_on_cpu(tmp_path, tiny_base) -> None:
    import bitsandbytes as bnb

    module, trainer = _fit(tmp_path, tiny_base, max_steps=2, quantization="nf4")
    assert trainer.global_step == 2
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())


def test_neftune_in_module_uses_packed_example_lengths() -> None:
    module = CausalLM(backbone=tiny_backbone(), neftune_alpha=5.0)
    module.configure_model()
    seen = []
    original = module.neftune._hook

    def spy(mod, inputs, output):
        seen.append(None if module.neftune.lengths is None else module.neftune.lengths.clone())
        return original(mod, inputs, output)

    module.neftune.detach()
    module.model.get_input_embeddings().register_forward_hook(spy)
    # One row packing examples of 3 and 5 tokens, then a 2-token padding segment.
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 1, 7, 8, 9, 10, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]),
    }
    module.train()
    noisy_a, noisy_b = module.forward_hidden(batch), module.forward_hidden(batch)
    assert seen[0].tolist() == [[3, 3, 3, 5, 5, 5, 5, 5, 2, 2]]
    assert not torch.allclose(noisy_a, noisy_b)
    module.eval()
    clean_a, clean_b = module.forward_hidden(batch), module.forward_hidden(batch)
    torch.testing.assert_close(clean_a, clean_b)
