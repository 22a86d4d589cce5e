"""Preference optimisation without a reward model: DPO and its variants (IPO, hinge, robust DPO, SimPO) on the
shared backbone.

One base model (optionally 4-bit) carries two named LoRA adapters (:mod:`lit_ft.backbone.roles`):

- ``policy``: trainable, a copy of the SFT adapter by default (or a fresh adapter on the base);
- the reference: ``reference: adapter`` (the default here) is a frozen copy of the SFT adapter, the model DPO's
  implicit reward is measured from; ``reference: base`` is the base with adapters disabled, right only when the
  SFT adapter was merged into the base (a warning says so otherwise, as for PPO).

Each step puts a micro-batch of pairs through the policy in ONE forward pass: chosen and rejected side by side in
one packed row (position ids restarting per example: with ``attn_implementation: lit_ft_packed`` attention stays
within an example and costs sum(L_i^2)), or as 2B right-padded rows (``data.packing: false``). Log-probs are summed
over the response tokens only, projecting only those positions through the vocabulary
(:func:`lit_ft.losses.preference.sequence_logps_from_hidden`). The loss is the pure function ``loss_type`` names
in :mod:`lit_ft.losses.preference`; metrics carry TRL's names (``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``).

``precompute_ref_log_probs`` (TRL's setting of that name) runs the reference once over the training pairs before
the first step, in dataset order, and keeps the (pairs, 2) log-probs in the module: each step then needs the policy
forward only. The cache goes into every checkpoint (key ``dpo``), so a resumed run reads it back instead of
recomputing it, and ends with the same weights as an uninterrupted one.

The held-out evaluation before training and after is the callback every stage shares
(:mod:`lit_ft.callbacks.evaluation`): DPO lends it the policy and the reference (:meth:`DPO.evaluation_roles`),
and it reports the gold win-rate (when the data has a gold judge), exact match and the KL of the policy to the
reference along each greedy answer. The adapter is exported to ``export_dir`` as the other stages export theirs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader

from lit_ft.backbone import Backbone, active_adapter, decoder_and_head
from lit_ft.backbone.adapters import save_adapter
from lit_ft.backbone.roles import POLICY, Reference
from lit_ft.callbacks.evaluation import EvaluationRoles, GenerationTable
from lit_ft.data.preference import pair_values
from lit_ft.errors import ConfigError
from lit_ft.losses.preference import (
    LossType,
    PreferenceLossSettings,
    preference_loss,
    preference_metrics,
    sequence_logps_from_hidden,
)
from lit_ft.stages.policy_stage import PolicyStage
from lit_ft.stages.schedules import WarmupCosine, default_optimizer

CACHE_KEY = "dpo"  # the checkpoint key of the reference cache


class DPO(PolicyStage):
    """DPO-family preference optimisation of a LoRA policy against a frozen reference, with exact resume.

    Args:
        backbone: the base model (``pretrained``, quantisation, dtype, attention, gradient checkpointing). Its
            ``lora`` settings make the policy adapter when it starts fresh (``policy_adapter: null``).
        policy_adapter: the SFT adapter the policy starts from (must exist when set): DPO refines a model that
            already answers, as in every DPO recipe (Rafailov et al. 2023 start from the SFT model).
        reference: "adapter" (a frozen copy of ``reference_adapter``, default the policy adapter: the SFT model)
            or "base" (adapters disabled; right only when the SFT adapter was merged into the base).
        reference_adapter: the adapter of the "adapter" reference.
        loss_type: "sigmoid" (DPO; with ``label_smoothing``, conservative DPO), "ipo", "hinge", "robust", or
            "simpo" (reference-free, length-normalised; the reference is then loaded for the KL report only).
        beta: the loss's temperature (0.1: the DPO paper's and TRL's default; SimPO wants ~2, see
            :class:`lit_ft.losses.preference.PreferenceLossSettings`).
        label_smoothing: probability that a pair's label is flipped (0: trusted labels).
        simpo_gamma: SimPO's target reward margin (0.5: TRL's CPOConfig default).
        sft_weight: weight of the chosen responses' token NLL added to the loss (RPO; 0: none).
        precompute_ref_log_probs: compute the reference's log-probs of every training pair once before training
            and keep them with the run (False: the reference runs beside the policy at every step, as TRL's default).
        optimizer: callable making the optimiser from the policy adapter's parameters.
        scheduler: callable making the LR scheduler (warm-up + cosine by default).
        num_eval: held-out prompts answered before and after training (greedy) by the evaluation callback
            (:class:`lit_ft.callbacks.evaluation.GenerationTable`), None for all, 0 for none.
        eval_batch_size: prompts per generation batch in that evaluation.
        max_new_tokens: longest held-out answer.
        export_dir: where the policy adapter (PEFT format, with the tokenizer and ``lit_ft_base.json``) is written
            when training ends.
    """

    stage = "dpo"
    exported = "DPO policy adapter"

    def __init__(
        self,
        backbone: Backbone | None = None,
        policy_adapter: str | None = "artifacts/sft/adapter",
        reference: Reference = "adapter",
        reference_adapter: str | None = None,
        loss_type: LossType = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        sft_weight: float = 0.0,
        precompute_ref_log_probs: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = WarmupCosine,
        num_eval: int | None = 200,
        eval_batch_size: int = 64,
        max_new_tokens: int = 32,
        export_dir: str | None = None,
    ):
        super().__init__(backbone, policy_adapter, reference, optimizer, scheduler, export_dir)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.loss = PreferenceLossSettings(loss_type, beta, label_smoothing, simpo_gamma,
                                           sft_weight)  # ConfigError when invalid
        if reference == "adapter" and reference_adapter is None and policy_adapter is None:
            raise ConfigError("reference: adapter needs model.reference_adapter (or a policy_adapter); with a fresh "
                              "policy set reference: base")
        self.reference_adapter = reference_adapter or policy_adapter
        self.precompute_ref_log_probs = precompute_ref_log_probs
        self.num_eval, self.eval_batch_size, self.max_new_tokens = num_eval, eval_batch_size, max_new_tokens
        self.ref_cache: torch.Tensor | None = None  # (pairs, 2) reference log-probs, in dataset order

    # ------------------------------------------------------------------ model
    def _add_roles(self, model: nn.Module) -> nn.Module:
        """The reference beside the policy. Dropout goes with the roles (TRL's ``disable_dropout=True``): at step 0
        the policy equals the reference exactly."""
        return self._with_reference(model, self.reference_adapter).train()

    # ------------------------------------------------------------ forwards
    def pair_logps(self, batch: dict[str, torch.Tensor], adapter: str | None = POLICY
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs and response lengths of every pair of ``batch`` under ``adapter`` (None:
        adapters disabled), each (B, 2) as (chosen, rejected), from ONE forward pass over chosen and rejected."""
        decoder, head = decoder_and_head(self.model)
        packed = "real_segments" in batch
        with active_adapter(self.model, adapter):
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             position_ids=batch["position_ids"], use_cache=False).last_hidden_state
            logps, lengths = sequence_logps_from_hidden(hidden, head, batch["labels"],
                                                        batch["position_ids"] if packed else None)
        return pair_values(logps, batch), pair_values(lengths, batch)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor], cached: bool = True) -> torch.Tensor | None:
        """The reference's (B, 2) log-probs: from the precomputed cache when there is one (training pairs), else a
        forward pass under the reference; None for reference-free losses."""
        if not self.loss.needs_reference:
            return None
        if cached and self.ref_cache is not None:
            return self.ref_cache[batch["index"].cpu()].to(self.device)
        return self.pair_logps(batch, self._reference_name)[0]

    def loss_and_metrics(self, batch: dict[str, torch.Tensor], cached: bool = True
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy, lengths = self.pair_logps(batch)
        ref = self.reference_logps(batch, cached)
        ref_chosen, ref_rejected = (None, None) if ref is None else (ref[:, 0], ref[:, 1])
        out = preference_loss(self.loss, policy[:, 0], policy[:, 1], ref_chosen, ref_rejected, lengths[:, 0],
                              lengths[:, 1])
        return out.loss, preference_metrics(out, policy[:, 0], policy[:, 1])

    # --------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.loss_and_metrics(batch)
        pairs = int(batch["index"].numel())
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=pairs)
        self.log_dict(metrics, batch_size=pairs)  # TRL's names, unprefixed as TRL logs its training metrics
        self.log("acc", metrics["rewards/accuracies"], prog_bar=True, logger=False, batch_size=pairs)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("lr", optimizer.param_groups[0]["lr"], rank_zero_only=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics = self.loss_and_metrics(batch, cached=False)  # the cache holds the training pairs only
        pairs = int(batch["index"].numel())
        self.log("val/loss", loss, prog_bar=True, batch_size=pairs)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=pairs)

    test_step = validation_step

    # ------------------------------------------------------------ reference cache
    @torch.no_grad()
    def compute_reference_cache(self, dataset, collator, batch_size: int) -> torch.Tensor:
        """The reference's (pairs, 2) log-probs of every pair of ``dataset``, in one pass in dataset order."""
        from tqdm.auto import tqdm

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
        cache = torch.zeros(len(dataset), 2, dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        context = (self.trainer.precision_plugin.forward_context() if self._trainer is not None
                   else contextlib.nullcontext())
        with context:
            for batch in tqdm(loader, desc="dpo: reference log-probs", disable=not self._is_global_zero()):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                cache[batch["index"].cpu()] = self.pair_logps(batch, self._reference_name)[0].float().cpu()
        self.model.train(was_training)
        return cache

    def _is_global_zero(self) -> bool:
        return self._trainer is None or self.trainer.is_global_zero

    def _prepare_reference_cache(self) -> None:
        """Precompute the reference log-probs once (not again on resume: the checkpoint brought them back)."""
        if not (self.precompute_ref_log_probs and self.loss.needs_reference):
            self.ref_cache = None
            return
        datamodule = self.trainer.datamodule
        pairs = len(datamodule.train_dataset)
        if self.ref_cache is not None and len(self.ref_cache) == pairs:
            rank_zero_only(print)(f"dpo: reference log-probs of {pairs} pairs from the checkpoint")
            return
        self.ref_cache = self.compute_reference_cache(datamodule.train_dataset, datamodule.collator(),
                                                      datamodule.micro_batch_size)
        rank_zero_only(print)(f"dpo: reference log-probs of {pairs} pairs precomputed")

    # ------------------------------------------------------------ evaluation
    def evaluation_roles(self) -> EvaluationRoles:
        """The held-out evaluation's roles (:mod:`lit_ft.callbacks.evaluation`): the policy adapter, and the
        reference (the frozen SFT adapter, or the bare base) for the KL along each greedy answer."""
        return self._evaluation_roles(("SFT policy" if self.policy_adapter else "start", f"{self.loss.loss_type} policy"),
                                      self.max_new_tokens)

    def configure_callbacks(self) -> list[L.Callback]:
        """The held-out evaluation with DPO's settings (``num_eval``, ``eval_batch_size``); it replaces a
        :class:`GenerationTable` of the trainer's. ``num_eval: 0`` turns it off."""
        return GenerationTable.for_stage(self.num_eval, self.eval_batch_size, self.max_new_tokens)

    def on_train_start(self) -> None:
        self._prepare_reference_cache()

    # ------------------------------------------------------------ checkpoints, export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The policy adapter (the contract keeps trainable tensors only) and the reference cache: a resumed run
        reads the cache back instead of recomputing it."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CACHE_KEY] = {"ref_cache": self.ref_cache}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # refuses a checkpoint the config does not continue
        self.ref_cache = (checkpoint.get(CACHE_KEY) or {}).get("ref_cache")

    def export(self, directory: str) -> Path:
        """The policy adapter in PEFT format, with the tokenizer and ``lit_ft_base.json``."""
        return save_adapter(self.model, directory, POLICY, self.tokenizer, self.base_record())

