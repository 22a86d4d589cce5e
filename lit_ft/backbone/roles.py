"""The policy and reference roles on one base model, shared by the stages that train a policy against a reference
(PPO, DPO, GRPO: :class:`lit_ft.stages.policy_stage.PolicyStage` puts them on).

* The **policy** is a trainable LoRA adapter named ``policy``: a copy of a saved adapter (the SFT output), or a
  fresh one on the base.
* The **reference** is what the policy is measured against. ``reference: base`` is the base with every adapter
  disabled (no extra weights); ``reference: adapter`` is a frozen copy of a saved adapter named ``reference``
  (by default the one the policy started from). The base weights exist once either way.

Which reference is right depends on whether the SFT adapter was merged into the base. Unmerged (the embedded
default, and the 7B recipe), the base with adapters disabled is the *pre-SFT* model, ~20 nats of KL away from the
SFT policy: PPO's KL penalty then pulls the policy back towards the pre-SFT model, and DPO's implicit rewards and
KL are measured from it. Use ``reference: adapter`` there; ``reference: base`` is right when the SFT adapter was
merged into the base (then the base is the SFT model). :func:`warn_unmerged_reference` says so at build time.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

from torch import nn

from lit_ft.backbone.adapters import add_adapter, load_adapter
from lit_ft.backbone.builder import LoraSettings
from lit_ft.errors import BackboneError, ConfigError, check_choice

log = logging.getLogger("lit_ft")

POLICY, REFERENCE = "policy", "reference"
Reference = Literal["base", "adapter"]


def check_reference(reference: str) -> None:
    """A reference setting other than "base" or "adapter" is a one-line :class:`ConfigError`."""
    check_choice("reference", reference, Reference)


def add_policy(model, policy_adapter: str | None, fresh: LoraSettings):
    """Put the trainable ``policy`` adapter on ``model``: a copy of ``policy_adapter`` (which must exist), or a fresh
    adapter with the ``fresh`` settings when it is None. Returns the (PEFT) model and a line saying which."""
    if policy_adapter is None:
        return add_adapter(model, dataclasses.replace(fresh, adapter_name=POLICY)), "policy from a fresh adapter on the base"
    if not (Path(policy_adapter) / "adapter_config.json").exists():
        raise BackboneError(f"{policy_adapter}: policy adapter not found (run `make sft`, or set "
                            "model.policy_adapter: null to start from a fresh adapter)")
    return load_adapter(model, policy_adapter, POLICY, trainable=True), f"policy from the adapter at {policy_adapter}"


def add_reference(model, reference: str, reference_adapter: str | None):
    """Put the reference on ``model``: for "adapter" a frozen copy of ``reference_adapter`` named ``reference``; for
    "base" nothing (adapters are disabled when it is used). Returns the model and the adapter name to run the
    reference under (None: adapters disabled), for :func:`lit_ft.backbone.adapters.active_adapter`."""
    check_reference(reference)
    if reference == "base":
        return model, None
    if reference_adapter is None:
        raise ConfigError("reference: adapter needs model.reference_adapter (or a policy_adapter)")
    return load_adapter(model, reference_adapter, REFERENCE, trainable=False), REFERENCE


def warn_unmerged_reference(stage: str, reference: str, policy_adapter: str | None) -> None:
    """Warn when the reference is the bare base while the policy starts from a saved adapter: unless that adapter
    was merged into the base, the reference is the model before that adapter (see the module docstring)."""
    if reference == "base" and policy_adapter is not None:
        log.warning("lit_ft: %s reference: base is the base with adapters disabled, i.e. the model before the "
                    "adapter at %s unless it was merged into the base; set reference: adapter to measure the policy "
                    "against that adapter (the SFT model)", stage, policy_adapter)


def train_only(model: nn.Module, adapters: tuple[str, ...]) -> None:
    """Make exactly the parameters of the named adapters trainable (PEFT's ``set_adapter`` toggles them too)."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(f".{adapter}." in name for adapter in adapters))


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout to 0, so that the policy's log-probs match between forward passes (PPO's rollout and
    update; DPO's policy at step 0 and its precomputed reference, as TRL's ``disable_dropout=True`` default)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
