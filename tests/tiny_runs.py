"""Whole `lit-ft fit` runs on tiny models: configs written into a test's folder, run as a subprocess, plus the
test-only callbacks and checkpoint writer that kill such a run (SIGKILL) at a chosen point."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from lit_ft.callbacks.checkpointing import AtomicCheckpointIO
from lit_ft.cli import STANDARD_CALLBACKS
from tests.tiny_models import ROOT, TINY

SUBPROCESS_TIMEOUT_S = 300  # one tiny run takes ~15 s on 2 cores; a hung DDP rendezvous must not hang the suite
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}  # dropout 0: runs are deterministic
# The CLI's standard callbacks off: a tiny run has exactly the callbacks its trainer config lists.
STANDARD_OFF: dict[str, None] = dict.fromkeys(STANDARD_CALLBACKS)


def write_alpaca(path: Path, n: int) -> Path:
    """``n`` Alpaca records of a few tokens each, as JSON lines."""
    rows = [{"instruction": f"Add {i} and {i % 7}.", "input": "", "output": str(i + i % 7)} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def trainer_config(run_dir: Path, max_steps: int, every: int, *, wandb: bool = True,
                   callbacks: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
    """CPU trainer: checkpoints every ``every`` steps into ``run_dir/checkpoints``, W&B offline in ``run_dir``."""
    logger: Any = False
    if wandb:
        logger = {"class_path": "lit_ft.loggers.wandb_logger.WandbLogger",
                  "init_args": {"project": "lit_ft_tests", "save_dir": str(run_dir), "offline": True}}
    checkpoint = {"class_path": "lit_ft.callbacks.checkpointing.ModelCheckpoint",
                  "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True,
                                "every_n_train_steps": every, "save_top_k": 0}}
    config = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": max_steps,
              "log_every_n_steps": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0,
              "enable_model_summary": False, "enable_progress_bar": False, "logger": logger,
              "callbacks": [checkpoint] + list(callbacks or [])}
    config.update(extra)
    return config


def backbone_config(base: str, adapter_name: str | None = "sft") -> dict[str, Any]:
    lora = dict(LORA, adapter_name=adapter_name) if adapter_name else dict(LORA)
    return {"pretrained": base, "compute_dtype": "float32", "lora": lora}


def sft_config(base: str, data: Path, run_dir: Path, max_steps: int = 10, every: int = 2,
               micro_batch_size: int = 2, **trainer: Any) -> dict[str, Any]:
    """LoRA SFT of the tiny base on ``data`` (packed rows of 128 tokens), exporting to ``run_dir/adapter``."""
    return {
        "seed_everything": 42,
        "trainer": trainer_config(run_dir, max_steps, every, **trainer),
        **STANDARD_OFF,
        "model": {"class_path": "lit_ft.stages.causal_lm.CausalLM",
                  "init_args": {"backbone": backbone_config(base),
                                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
                                "export_dir": str(run_dir / "adapter")}},
        "data": {"class_path": "lit_ft.data.instruction.InstructionDataModule",
                 "init_args": {"source": str(data), "val_split_fraction": 0.0, "max_seq_length": 128,
                               "micro_batch_size": micro_batch_size}},
    }


def ppo_config(base: str, run_dir: Path, max_steps: int = 16, every: int = 8, **trainer: Any) -> dict[str, Any]:
    """PPO from a fresh policy adapter with exact-match reward and an adaptive KL controller: 4 updates a batch."""
    return {
        "seed_everything": 42,
        "trainer": trainer_config(run_dir, max_steps, every, **trainer),
        **STANDARD_OFF,
        "model": {"class_path": "lit_ft.stages.ppo.PPO",
                  "init_args": {"backbone": backbone_config(base, None), "policy_adapter": None,
                                "reward_model": None, "value_init": "fresh", "reference": "base",
                                "rewards": [{"class_path": "lit_ft.rl.rewards.ExactMatchReward"}],
                                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
                                "kl": {"controller": {"class_path": "lit_ft.rl.kl.AdaptiveKLController",
                                                      "init_args": {"init_beta": 0.1, "target": 1.0, "horizon": 100}}},
                                "sampling": {"temperature": 1.0, "max_new_tokens": 4},
                                "ppo": {"epochs": 2, "minibatch_size": 4, "forward_batch_size": 4},
                                "evaluation": {"num_prompts": 2, "batch_size": 2},
                                "export_dir": str(run_dir / "out")}},
        "data": {"class_path": "lit_ft.data.prompts.PromptDataModule",
                 "init_args": {"source": {"class_path": "lit_ft.data.embedded.EmbeddedWorld",
                                          "init_args": {"num_train": 24, "num_heldout": 2}},
                               "micro_batch_size": 8}},
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_fit(config: Path, cwd: Path, *args: str, timeout: int = SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m lit_ft fit --config <config> <args>`` in ``cwd``, with this checkout importable (tests too)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Each run starts its own W&B service, as a user's `lit-ft` does: inherited from this pytest process (where an
    # earlier in-process test started W&B), a SIGKILLed run's stream would stay open in the shared service and
    # keep its run id "in use" for the resume.
    env.pop("WANDB_SERVICE", None)
    command = [sys.executable, "-m", "lit_ft", "fit", "--config", str(config), *args]
    return subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def save_tiny_base(directory: Path, tokenizer) -> str:
    """A tiny Mistral base (random weights, seed 0) saved like `make pretrain` leaves it."""
    from lit_ft.backbone import Backbone, build_model, save_full_model

    torch.manual_seed(0)
    model = build_model(Backbone(pretrained=None, tiny=dataclasses.replace(TINY), lora=None), tokenizer)
    return str(save_full_model(model, directory, tokenizer))


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a, (sorted(a)[:3], sorted(b)[:3])
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def read_batches(path: Path) -> list[tuple[int, str]]:
    """The (global step, batch digest) lines a :class:`RecordBatches` callback wrote, in order."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(step), digest) for step, digest in (line.split() for line in lines)]


# ------------------------------------------------------------------------------ test-only callbacks and IO
class RecordBatches(L.Callback):
    """Appends ``<global step> <digest of the batch>`` for every training batch (survives a SIGKILL: one write
    and close per line)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        key = "index" if "index" in batch else "input_ids"
        digest = hashlib.sha1(batch[key].cpu().numpy().tobytes()).hexdigest()[:16]
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {digest}\n")


class KillAt(L.Callback):
    """SIGKILLs its own process when a training batch ends at ``step`` optimizer steps (no cleanup at all)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtTrainEnd(L.Callback):
    """SIGKILLs its own process when training ends, after the last checkpoint and before the module's end-of-training
    work (callbacks' ``on_train_end`` runs before the module's: the export never happens)."""

    def on_train_end(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class KillingCheckpointIO(AtomicCheckpointIO):
    """Atomic writer that, for the checkpoint of ``step``, leaves half the bytes in the temporary file and
    SIGKILLs the process before the rename: a kill in the middle of a checkpoint write."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step
        self._writing: int | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self._writing = checkpoint.get("global_step")
        super().save_checkpoint(checkpoint, path, storage_options)

    def commit(self, tmp: Path, target: Path) -> None:
        if self._writing == self.step:
            with open(tmp, "rb+") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            self.interrupt(tmp)
        super().commit(tmp, target)

    def interrupt(self, tmp: Path) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class RecordRanks(AtomicCheckpointIO):
    """Atomic writer that also leaves a ``saved-by-rank-<r>`` marker beside each checkpoint it writes."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        (Path(path).parent / f"saved-by-rank-{rank}").write_text(str(checkpoint.get("global_step")))


class PoisonAt(L.Callback):
    """Makes the loss NaN at the given global steps: one trainable tensor whose name contains ``target`` is NaN
    during that batch, and restored after it. ``changed`` says, per poisoned step, whether any trainable weight
    moved across it."""

    def __init__(self, steps: list[int], target: str = "lora_B"):
        self.steps = steps
        self.target = target
        self.changed: list[bool] = []
        self._saved: tuple[torch.nn.Parameter, torch.Tensor, dict[str, torch.Tensor]] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step not in self.steps:
            return
        trainable = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        param = next(p for n, p in trainable.items() if self.target in n)
        self._saved = (param, param.detach().clone(), {n: p.detach().clone() for n, p in trainable.items()})
        with torch.no_grad():
            param.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self._saved is None:
            return
        param, value, before = self._saved
        self._saved = None
        with torch.no_grad():
            param.copy_(value)
        now = dict(pl_module.named_parameters())
        self.changed.append(any(not torch.equal(now[n], v) for n, v in before.items()))


class RecordLR(L.Callback):
    """Appends ``<global step> <learning rate> <sum of |trainable weights|>`` before every training batch: the LR
    that step trains with, and the weights it starts from (survives a SIGKILL: one write and close per line)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        weights = sum(float(p.detach().abs().sum()) for p in pl_module.parameters() if p.requires_grad)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {lr!r} {weights!r}\n")


def read_lrs(path: Path) -> list[tuple[int, float, float]]:
    """The (global step, learning rate, weight sum) lines a :class:`RecordLR` callback wrote, in order."""
    return [(int(s), float(lr), float(w)) for s, lr, w in (line.split() for line in path.read_text().splitlines())]


class FullDiskAt(KillingCheckpointIO):
    """Atomic writer whose write of the checkpoint of ``step`` fails as on a full disk: half the bytes reach the
    temporary file, then ``OSError(ENOSPC)``."""

    def interrupt(self, tmp: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))


def perturb_lora(model, adapter: str, seed: int) -> None:
    """LoRA B starts at zero (an identity adapter); make the adapter actually change the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def save_base_and_sft(root: Path, tokenizer) -> dict[str, str]:
    """A tiny base and a perturbed SFT adapter on it (r 4), as `make sft` leaves them: ``{"base", "sft"}`` paths."""
    from lit_ft.backbone import (
        Backbone,
        LoraSettings,
        add_adapter,
        build_model,
        save_adapter,
        save_full_model,
    )

    torch.manual_seed(0)
    base = str(save_full_model(build_model(Backbone(pretrained=None, tiny=TINY, lora=None), tokenizer),
                               root / "base", tokenizer))
    sft = add_adapter(build_model(Backbone(pretrained=base, lora=None), tokenizer),
                      LoraSettings(r=4, alpha=8, dropout=0.0, adapter_name="sft"))
    perturb_lora(sft, "sft", 1)
    save_adapter(sft, root / "sft", "sft", tokenizer)
    return {"base": base, "sft": str(root / "sft")}
