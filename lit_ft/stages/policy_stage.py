"""What the stages that train a LoRA policy against a frozen reference share (DPO, PPO, GRPO): one base model
built once, the ``policy`` and reference roles on it (:mod:`lit_ft.backbone.roles`), the optimiser over the
trainable adapters, the roles lent to the held-out evaluation, and the export when training ends.

A stage subclasses :class:`PolicyStage`, calls :meth:`PolicyStage.__init__` first, and puts its own roles (the
reference through ``_with_reference``, a value model, a reward model) on the model in ``_add_roles``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lit_ft.backbone import Backbone, BackboneModule, LoraSettings, active_adapter, build_model
from lit_ft.backbone.roles import (
    POLICY,
    add_policy,
    add_reference,
    check_reference,
    disable_dropout,
    train_only,
    warn_unmerged_reference,
)
from lit_ft.callbacks.evaluation import EvaluationRoles
from lit_ft.stages.run_contract import CheckpointContract
from lit_ft.stages.schedules import lora_param_groups, optimizer_and_schedule


class PolicyStage(CheckpointContract, BackboneModule, L.LightningModule):
    """A trainable ``policy`` adapter and a frozen reference on one base model.

    Args (the subclass's, passed on):
        backbone: the base model; its ``lora`` settings make any adapter that starts fresh (None: a default
            :class:`LoraSettings`).
        policy_adapter: the SFT adapter the policy starts from (must exist when set), or None for a fresh one.
        reference: "adapter" or "base" (:data:`lit_ft.backbone.roles.Reference`).
        optimizer, scheduler: the callables making the optimiser and its per-step LR schedule.
        export_dir: where the trained adapters are written when training ends (None: nowhere).
    """

    stage = "policy"
    exported = "policy"  # what the line at the end of training says was saved
    trainable_roles: tuple[str, ...] = (POLICY,)  # the adapters that train

    def __init__(self, backbone: Backbone | None, policy_adapter: str | None, reference: str,
                 optimizer: OptimizerCallable, scheduler: LRSchedulerCallable, export_dir: str | None):
        super().__init__()
        check_reference(reference)
        self.backbone = backbone or Backbone(lora=LoraSettings())
        self.policy_adapter, self.reference = policy_adapter, reference
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.export_dir = export_dir
        self._tokenizer = None
        self.model: nn.Module | None = None
        self._reference_name: str | None = None  # the adapter the reference runs under (None: adapters disabled)
        self._has_reference = False  # whether the reference was put on the model at all

    # ------------------------------------------------------------------ roles
    def configure_model(self) -> None:
        """Build the base once and put the roles on it (idempotent): the policy, the stage's own roles
        (:meth:`_add_roles`), then the policy active and only the ``trainable_roles`` training."""
        if self.model is not None:
            return
        self._set_roles(self._add_roles(self._base_with_policy()))

    def _add_roles(self, model: nn.Module) -> nn.Module:
        """The stage's roles beside the policy (at least the reference, by :meth:`_with_reference`)."""
        raise NotImplementedError

    def _base_with_policy(self) -> nn.Module:
        """The base, built once without adapters, with the ``policy`` adapter on it (a line says which)."""
        model = build_model(dataclasses.replace(self.load_spec(), lora=None, init_adapter=None), self.tokenizer,
                            device_map=self.quantized_device_map())
        model, how = add_policy(model, self.policy_adapter, self.backbone.lora or LoraSettings())
        rank_zero_only(print)(f"{self.stage}: {how}")
        return model

    def _with_reference(self, model: nn.Module, reference_adapter: str | None) -> nn.Module:
        """Put the reference on ``model`` (a frozen copy of ``reference_adapter``, or nothing for the bare base),
        warning when the bare base is probably the wrong reference."""
        warn_unmerged_reference(self.stage, self.reference, self.policy_adapter)
        model, self._reference_name = add_reference(model, self.reference, reference_adapter)
        self._has_reference = True
        return model

    def _set_roles(self, model: nn.Module) -> None:
        """The policy active, exactly the ``trainable_roles`` adapters training (PEFT's ``set_adapter`` toggles them
        too: set once), and no dropout: the policy's log-probs must agree between passes (the rollout and the
        update; DPO's policy at step 0 and its reference, as TRL's ``disable_dropout=True``)."""
        model.set_adapter(POLICY)
        train_only(model, self.trainable_roles)
        disable_dropout(model)
        self.model = model

    def _evaluation_roles(self, names: tuple[str, str], max_new_tokens: int, **extra: Any) -> EvaluationRoles:
        """The held-out evaluation's roles (:mod:`lit_ft.callbacks.evaluation`): the policy adapter, and the
        reference for the KL when it was put on the model; ``extra`` adds the scorer and the temperature."""
        reference = None
        if self._has_reference:
            name = self._reference_name
            reference = lambda: active_adapter(self.model, name)
        return EvaluationRoles(self.model, self.tokenizer, policy=lambda: active_adapter(self.model, POLICY),
                               reference=reference, names=names, max_new_tokens=max_new_tokens, **extra)

    # ------------------------------------------------------------ optimiser, export
    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer_and_schedule(lora_param_groups(self, self.backbone.lora), self.optimizer_fn,
                                      self.scheduler_fn, self.trainer.estimated_stepping_batches)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero and self.export_dir:
            print(f"lit_ft: saved the {self.exported} to {self.export(self.export_dir)}")
