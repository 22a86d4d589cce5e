"""Checkpoint writing: all-or-nothing writes, stale temporary files, the best k by a monitored metric plus `last`,
and checkpoints that hold the adapter and its optimiser state, never the frozen base."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_ft.backbone import Backbone, LoraSettings
from lit_ft.callbacks import preflight
from lit_ft.callbacks.checkpointing import (
    TMP_PREFIX,
    AtomicCheckpointIO,
    ModelCheckpoint,
    remove_stale_writes,
)
from lit_ft.data.instruction import InstructionDataModule
from lit_ft.errors import OutputError
from lit_ft.stages.causal_lm import CausalLM
from tests.tiny_runs import RecordRanks, save_tiny_base, write_alpaca


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("ckpt_base") / "tiny", tokenizer)


def test_atomic_write_replaces_whole_file_and_leaves_old_one_on_failure(tmp_path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    assert torch.load(target, weights_only=False)["global_step"] == 1
    assert not list(target.parent.glob(f"{TMP_PREFIX}*"))  # the temporary file was renamed, not copied

    def killed(*args):  # the process dies between the finished temporary file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False)["global_step"] == 1  # the previous checkpoint is intact
    assert remove_stale_writes(target.parent) and not list(target.parent.glob(f"{TMP_PREFIX}*"))
    assert "last" not in TMP_PREFIX  # Lightning's `ckpt_path="last"` search must never pick a temporary file


def _fit(tmp_path: Path, base: str, tokenizer, callbacks: list, max_steps: int = 8, **trainer) -> L.Trainer:
    L.seed_everything(3)
    module = CausalLM(Backbone(pretrained=base, lora=LoraSettings(r=4, alpha=8, dropout=0.0, adapter_name="sft")),
                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = InstructionDataModule(source=str(write_alpaca(tmp_path / "train.jsonl", 40)), val_split_fraction=0.2,
                                 max_seq_length=64, micro_batch_size=2)
    data.connect(tokenizer)
    settings = {"max_steps": max_steps, "logger": False, "callbacks": callbacks, "enable_progress_bar": False,
                "enable_model_summary": False, "accelerator": "cpu", "num_sanity_val_steps": 0}
    fit = L.Trainer(**{**settings, **trainer})
    fit.fit(module, datamodule=data)
    return fit


class _Scores(L.Callback):
    """Every validation loss, in order."""

    def __init__(self):
        self.losses: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.losses.append(float(trainer.callback_metrics["val/loss"]))


def test_keeps_best_k_by_monitored_metric_plus_last_and_stays_adapter_sized(tmp_path, base, tokenizer) -> None:
    scores = _Scores()
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", mode="min", save_top_k=2,
                           filename="best-{step}")
    trainer = _fit(tmp_path, base, tokenizer, [scores, last, best], val_check_interval=2,
                   check_val_every_n_epoch=None, limit_val_batches=2)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == sorted(["last.ckpt"] + [Path(p).name for p in best.best_k_models]), files
    assert len(scores.losses) == 4 and len(best.best_k_models) == 2
    kept = sorted(float(v) for v in best.best_k_models.values())
    assert kept == pytest.approx(sorted(scores.losses)[:2])  # the two lowest of the four validations
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 8

    # Adapter-sized: the trainable LoRA tensors and their optimiser state, never the frozen base.
    for name in files:
        checkpoint = torch.load(tmp_path / "ckpt" / name, weights_only=False)
        assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"]), name
        assert checkpoint["optimizer_states"] and checkpoint["loops"]
    base_bytes = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    assert (tmp_path / "ckpt" / "last.ckpt").stat().st_size < base_bytes / 5


def test_custom_checkpoint_io_is_kept(tmp_path, base, tokenizer) -> None:
    io = RecordRanks()
    trainer = _fit(tmp_path, base, tokenizer, [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)],
                   max_steps=2, plugins=[io], limit_val_batches=0)
    assert trainer.strategy.checkpoint_io is io and (tmp_path / "ckpt" / "saved-by-rank-0").exists()


def test_failed_write_removes_its_temporary_file_keeps_the_previous_checkpoint_and_says_so(tmp_path,
                                                                                          monkeypatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)

    def full_disk(obj, f, *args, **kwargs):  # half a checkpoint reaches the disk, then it is full
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError) as info:
        io.save_checkpoint({"global_step": 2}, target)
    monkeypatch.undo()
    assert str(info.value) == f"{target}: checkpoint not written (No space left on device); the previous last.ckpt is kept"
    assert torch.load(target, weights_only=False)["global_step"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_checkpoint_folder_is_checked_before_the_first_step(tmp_path, base, tokenizer, monkeypatch) -> None:
    """Unwritable (under a file) in setup; without room for the checkpoints it keeps (+1 being written) once the
    model is built; both before any step."""
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"ModelCheckpoint.dirpath \(.*file/ckpt\): not writable"):
        _fit(tmp_path, base, tokenizer, [ModelCheckpoint(dirpath=tmp_path / "file" / "ckpt", save_last=True)],
             max_steps=1, limit_val_batches=0)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=preflight.MARGIN_BYTES))
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=2, monitor="val/loss")
    with pytest.raises(OutputError, match=r"16.0 MiB free on its disk, the run needs about"):
        _fit(tmp_path, base, tokenizer, [callback], max_steps=1, limit_val_batches=0)
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))
    module = CausalLM(Backbone(pretrained=base, lora=LoraSettings(r=4, alpha=8, adapter_name="sft")))
    module.configure_model()
    lora_bytes = sum(p.numel() * 4 for n, p in module.named_parameters() if "lora_" in n)
    assert preflight.checkpoint_bytes(module) == 3 * lora_bytes  # weights and two Adam moments


def test_failed_export_leaves_the_previous_export_and_no_temporary_folder(tmp_path, tokenizer, monkeypatch) -> None:
    import safetensors.torch

    from lit_ft.backbone import build_model, save_adapter
    from tests.tiny_models import tiny_backbone

    model = build_model(tiny_backbone(), tokenizer)
    out = save_adapter(model, tmp_path / "adapter", "sft")
    before = sorted(p.name for p in tmp_path.rglob("*"))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "adapter.tmp"))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, out, "sft")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # the earlier export, and nothing else
