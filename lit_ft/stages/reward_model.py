"""Reward model: a LoRA adapter on the shared backbone plus a scalar score head, trained on preference pairs.

The reward of a sequence is ``score_head(h_last)``, where ``h_last`` is the last layer's hidden state at the
sequence's last real token (its EOS), wherever the padding is. Chosen and rejected rows of a batch go through
the model in one forward pass; the loss is :func:`lit_ft.losses.reward.reward_loss`.

At the end of each validation the mean and std of the held-out rewards are stored in buffers (``reward_mean``,
``reward_std``): they go into checkpoints and into the export, so that PPO can normalise scores.

The export (``export_dir``) holds the adapter in PEFT format (``adapter_config.json``,
``adapter_model.safetensors``, tokenizer), ``score_head.safetensors`` and ``reward_stats.json``.
:func:`load_reward_model` puts them back onto a base model, which may already carry other adapters (PPO keeps
policy, value and reward adapters on one base).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lit_ft.backbone import (
    Backbone,
    BackboneError,
    BackboneModule,
    LoraSettings,
    active_adapter,
    build_model,
    decoder_and_head,
    load_adapter,
    resolve_init_adapter,
    save_adapter,
)
from lit_ft.errors import ConfigError
from lit_ft.losses.reward import (
    PairMetrics,
    center_rewards_loss,
    pairwise_accuracy,
    pairwise_loss,
)
from lit_ft.padding import last_token_index, position_ids_from_mask
from lit_ft.stages.run_contract import CheckpointContract
from lit_ft.stages.schedules import WarmupCosine, default_optimizer, optimizer_and_schedule

HEAD_FILE = "score_head.safetensors"
STATS_FILE = "reward_stats.json"
DEFAULT_ADAPTER = "reward"


def init_score_head(head: nn.Linear) -> nn.Linear:
    """Normal weights with std 1/sqrt(d+1), zero bias: initial rewards have about unit variance."""
    nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
    nn.init.zeros_(head.bias)
    return head


def sequence_rewards(model: nn.Module, head: nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One reward per row, read at the row's last real token; float32, shape (rows,)."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    decoder, _ = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]
    return head(last.to(head.weight.dtype)).squeeze(-1).float()


class RewardModel(CheckpointContract, BackboneModule, L.LightningModule):
    """Pairwise (Bradley-Terry) reward model: LoRA on the shared backbone plus a scalar score head.

    Args:
        backbone: where the model comes from and its LoRA adapter (named "reward" by default). Set
            ``init_adapter`` to start from the SFT adapter; with ``init_adapter_required: false`` a missing one
            falls back to a fresh adapter on the base. The module prints which it used.
        optimizer: a callable making the optimiser from the trainable parameters (adapter and head).
        scheduler: a callable making the LR scheduler (warm-up + cosine by default).
        center_rewards_coefficient: weight of mean((r_chosen + r_rejected)^2) in the loss (0: off; 0.01 is
            the value Eisenstein et al. 2023 and TRL suggest). Keeps rewards near zero for PPO.
        export_dir: where to write the adapter, the score head and the reward statistics when training ends.
    """

    stage = "reward_model"
    checkpoint_buffers = ("reward_mean", "reward_std")  # checkpoints hold the adapter, the head and these

    def __init__(
        self,
        backbone: Backbone | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = WarmupCosine,
        center_rewards_coefficient: float = 0.0,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        backbone = backbone or Backbone(lora=LoraSettings(adapter_name=DEFAULT_ADAPTER))
        if backbone.lora is None:
            raise ConfigError("the reward model trains a LoRA adapter: set model.backbone.lora")
        if backbone.lora.adapter_name == LoraSettings.adapter_name:  # LoraSettings' generic "default"
            backbone = dataclasses.replace(backbone, lora=dataclasses.replace(backbone.lora,
                                                                              adapter_name=DEFAULT_ADAPTER))
        self.backbone = backbone
        self.optimizer_fn = optimizer
        self.scheduler_fn = scheduler
        self.center_rewards_coefficient = center_rewards_coefficient
        self.export_dir = export_dir
        self._tokenizer = None
        self.model: nn.Module | None = None
        self.score_head: nn.Linear | None = None
        self.register_buffer("reward_mean", torch.zeros((), dtype=torch.float32))
        self.register_buffer("reward_std", torch.ones((), dtype=torch.float32))
        self.val_metrics = PairMetrics()
        self.heldout: dict[str, float] | None = None  # the latest held-out evaluation
        self._heldout_step = -1

    @property
    def adapter_name(self) -> str:
        return self.backbone.lora.adapter_name

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the backbone and the score head once (idempotent: Lightning may call this more than once)."""
        if self.model is not None:
            return
        spec = self.backbone
        init = resolve_init_adapter(spec)
        base = spec.pretrained or "(a tiny model built from scratch)"
        if init is not None:
            message = f"starting from the adapter at {init} (its weights initialise the '{self.adapter_name}' adapter)"
        elif spec.init_adapter is not None:
            message = f"no adapter at {spec.init_adapter}: starting from the base model {base} with a fresh adapter"
        else:
            message = f"starting from the base model {base} with a fresh adapter"
        rank_zero_only(print)(f"reward model: {message}")
        self.model = build_model(self.load_spec(), self.tokenizer, device_map=self.quantized_device_map())
        self.model.train()
        hidden_size = self.model.get_input_embeddings().embedding_dim
        self.score_head = init_score_head(nn.Linear(hidden_size, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rewards of every row of ``batch`` (chosen rows first, then rejected rows), shape (2B,)."""
        return sequence_rewards(self.model, self.score_head, batch["input_ids"], batch["attention_mask"],
                                batch.get("position_ids"))

    def pair_rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards from one forward pass over all 2B rows."""
        rewards = self(batch)
        pairs = rewards.shape[0] // 2
        return rewards[:pairs], rewards[pairs:]

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, chosen rewards, rejected rewards); the pairwise part alone is what validation reports."""
        chosen, rejected = self.pair_rewards(batch)
        loss = pairwise_loss(chosen, rejected, batch.get("margin"))
        return loss, chosen, rejected

    # --------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, chosen, rejected = self.loss_terms(batch)
        total = loss
        if self.center_rewards_coefficient:
            total = loss + self.center_rewards_coefficient * center_rewards_loss(chosen, rejected)
        both = torch.cat([chosen, rejected]).detach()
        self.log("train/loss", total.detach(), prog_bar=True)
        self.log("train/pairwise_loss", loss.detach())
        self.log("train/accuracy", pairwise_accuracy(chosen, rejected), prog_bar=True)
        self.log("train/reward_gap", (chosen - rejected).detach().mean())
        self.log("train/reward_mean", both.mean())
        self.log("train/reward_std", both.std() if both.numel() > 1 else torch.zeros(()))
        return total

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("lr", optimizer.param_groups[0]["lr"], rank_zero_only=True)

    # ------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, chosen, rejected = self.loss_terms(batch)
        self.val_metrics.update(chosen, rejected, loss)

    def _epoch_metrics(self, metrics: PairMetrics, reduce: bool = True) -> dict[str, float]:
        """Compute (summed across DDP ranks when ``reduce``) and reset ``metrics``."""
        if reduce and self._trainer is not None and self.trainer.world_size > 1:
            metrics.reduce(lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum"))
        result = metrics.compute()
        metrics.reset()
        return result

    def _record_heldout(self, metrics: dict[str, float]) -> None:
        """Store the reward statistics with the model (buffers: checkpoint and export)."""
        if metrics["pairs"] == 0:
            return
        self.reward_mean.fill_(metrics["reward_mean"])
        self.reward_std.fill_(metrics["reward_std"])
        self.heldout = metrics
        self._heldout_step = self.global_step

    def on_validation_epoch_end(self) -> None:
        metrics = self._epoch_metrics(self.val_metrics)
        if metrics["pairs"] == 0:
            return
        for key in ("loss", "accuracy", "reward_gap", "reward_mean", "reward_std"):
            self.log(f"val/{key}", metrics[key], prog_bar=key in ("loss", "accuracy"))
        if not self.trainer.sanity_checking:
            self._record_heldout(metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        metrics = self._epoch_metrics(self.val_metrics)
        for key in ("loss", "accuracy", "reward_gap", "reward_mean", "reward_std"):
            self.log(f"test/{key}", metrics[key])

    @torch.no_grad()
    def evaluate(self, dataloader) -> dict[str, float]:
        """Pairwise metrics over ``dataloader`` outside the validation loop (used when training ends).

        Every process evaluates the whole loader (no distributed sampler), so nothing is reduced.
        """
        was_training = self.training
        self.eval()
        metrics = PairMetrics()
        context = self.trainer.precision_plugin.forward_context() if self._trainer is not None else (
            contextlib.nullcontext())
        with context:
            for batch in dataloader:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss, chosen, rejected = self.loss_terms(batch)
                metrics.update(chosen, rejected, loss)
        self.train(was_training)
        return self._epoch_metrics(metrics, reduce=False)

    # ------------------------------------------------------------- optimiser
    def evaluation_roles(self) -> None:
        """Nothing to generate: the held-out evaluation of a reward model is its pairwise accuracy (validation)."""
        return

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        return optimizer_and_schedule(params, self.optimizer_fn, self.scheduler_fn,
                                      self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------ export
    def reward_stats(self) -> dict[str, Any]:
        """What ``reward_stats.json`` holds: normalisation statistics and where the adapter belongs."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        stats: dict[str, Any] = {
            "mean": float(self.reward_mean),
            "std": float(self.reward_std),
            "adapter_name": self.adapter_name,
            "base_model": self.backbone.pretrained,
            "hidden_size": self.score_head.in_features,
            "prompt_format": getattr(datamodule, "prompt_format", None),
            "chat_template": getattr(datamodule, "chat_template", None),
            "global_step": self.global_step,
        }
        if self.heldout is not None:
            stats["heldout_accuracy"] = self.heldout["accuracy"]
            stats["heldout_pairs"] = self.heldout["pairs"]
        return stats

    def export(self, directory: str) -> Path:
        """Adapter (PEFT format, with the tokenizer and ``lit_ft_base.json``), ``score_head.safetensors`` and
        ``reward_stats.json``."""
        out = save_adapter(self.model, directory, self.adapter_name, self.tokenizer, self.base_record())
        write_reward_files(out, self.score_head.state_dict(), self.reward_stats())
        return out

    def on_train_end(self) -> None:
        """Evaluate on the held-out pairs (unless validation just did), print the accuracy, then export."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self._heldout_step != self.global_step and datamodule is not None:
            loader = datamodule.val_dataloader()
            if len(loader):
                self._record_heldout(self.evaluate(loader))
        if self.heldout is not None and self.trainer.is_global_zero:
            h = self.heldout
            for logger in self.trainer.loggers:
                logger.log_metrics({"eval/heldout_accuracy": h["accuracy"]}, step=self.global_step)
            print(f"held-out reward: mean {h['reward_mean']:.3f}, std {h['reward_std']:.3f}, "
                  f"chosen - rejected {h['reward_gap']:.3f}")
            print(f"held-out pairwise accuracy: {h['accuracy']:.1%} ({h['pairs']} pairs)")
        if self.export_dir and self.trainer.is_global_zero:
            print(f"lit_ft: saved reward model to {self.export(self.export_dir)}")


def write_reward_files(directory: Path, head_state: dict[str, torch.Tensor], stats: dict[str, Any]) -> None:
    """What makes an adapter folder a reward model export: the score head and the reward statistics."""
    from safetensors.torch import save_file

    head = {k: v.detach().float().cpu().contiguous() for k, v in head_state.items()}
    save_file(head, Path(directory) / HEAD_FILE)
    (Path(directory) / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")


class RewardScorer(nn.Module):
    """A reward adapter and its score head on a (shared) base model: ``scorer(input_ids, attention_mask)``.

    Scoring switches to the reward adapter for the call only, then restores the adapter that was active and
    every ``requires_grad`` flag. ``normalize=True`` returns (reward - mean) / std with the stored statistics.
    """

    def __init__(self, model: nn.Module, head: nn.Linear, adapter_name: str, stats: dict[str, Any]):
        super().__init__()
        self.model = model
        self.head = head
        self.adapter_name = adapter_name
        self.stats = stats
        device = head.weight.device
        self.register_buffer("reward_mean", torch.tensor(float(stats.get("mean", 0.0)), device=device))
        self.register_buffer("reward_std", torch.tensor(float(stats.get("std", 1.0)), device=device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                normalize: bool = False) -> torch.Tensor:
        with active_adapter(self.model, self.adapter_name):
            rewards = sequence_rewards(self.model, self.head, input_ids, attention_mask, position_ids)
        if normalize:
            rewards = (rewards - self.reward_mean) / self.reward_std.clamp(min=1e-6)
        return rewards


def load_reward_model(base_model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> RewardScorer:
    """Load an exported reward model onto ``base_model`` (a transformers model or a ``PeftModel``).

    The adapter is added under its saved name (or ``adapter_name``) and frozen; on a ``PeftModel`` the adapter
    that was active stays active and no other adapter's ``requires_grad`` changes. The scorer's ``.model`` is
    the ``PeftModel`` (``base_model`` itself when it already was one).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in ("adapter_config.json", HEAD_FILE, STATS_FILE):
        if not (directory / name).exists():
            raise BackboneError(f"{directory}: not a reward model export ({name} is missing)")
    stats = json.loads((directory / STATS_FILE).read_text())
    name = adapter_name or stats.get("adapter_name") or DEFAULT_ADAPTER
    previous = getattr(base_model, "active_adapter", None) if hasattr(base_model, "peft_config") else None
    flags = {n: p.requires_grad for n, p in base_model.named_parameters()}
    model = load_adapter(base_model, str(directory), name, trainable=False)
    if previous is not None:
        model.set_adapter(previous)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False) if f".{name}." not in n else False)
    state = load_file(str(directory / HEAD_FILE))
    head = nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    head.requires_grad_(False)
    return RewardScorer(model, head.to(next(model.parameters()).device), name, stats)
