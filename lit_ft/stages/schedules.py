"""Learning-rate schedules, injected into the modules as callables (``scheduler.class_path`` in the YAML).

Resuming (the rule in the README's resume section): the optimiser's and scheduler's *state* comes from the
checkpoint (Adam moments, the step counter), their *settings* from the config. With :class:`WarmupCosine` the
horizon is the config's run length (``trainer.max_steps``, or what ``max_epochs`` makes of it), recomputed on
every start: the learning rate at step s of a resumed run is the new schedule's value at s, so a run extended
from 4 to 8 steps continues at the 8-step schedule's step-4 LR instead of the 4-step schedule's final 0. Other
optimiser settings that differ from the checkpoint's (the peak LR, weight decay, betas) are the config's, and
are printed in one line.
"""

from __future__ import annotations

import importlib
import math
from functools import partial
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lit_ft.errors import ConfigError

UNBOUNDED_HORIZON = 1000  # steps of the cosine when the run has no step limit (max_steps: -1, no max_epochs)
RESUMED_SCHEDULER_KEYS = ("last_epoch", "_step_count", "_is_initial")  # a scheduler's state; the rest is settings


def default_optimizer(params):
    """AdamW at the QLoRA learning rate, for stages whose config names no optimiser."""
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)  # 2e-4: QLoRA paper's 7B setting


class WarmupCosine(LambdaLR):
    """Linear warm-up from 0, then cosine decay to ``min_lr_ratio`` x the base LR.

    Args:
        optimizer: the optimiser to schedule.
        warmup_steps: optimizer steps of linear warm-up (an int), or a fraction of the total when < 1
            (0.03: the QLoRA paper's warm-up ratio).
        total_steps: optimizer steps in the run; None takes ``trainer.estimated_stepping_batches`` (the module
            fills it in before the first step, also on resume: the horizon follows the config).
        min_lr_ratio: final LR as a fraction of the peak (0.0: plain cosine to zero, as in the QLoRA recipe).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: float = 0.03,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
    ):
        if not warmup_steps >= 0:
            raise ConfigError(f"scheduler warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps is not None and not total_steps >= 1:
            raise ConfigError(f"scheduler total_steps must be >= 1 (or null: the run's length), got {total_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"scheduler min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        total = max(1, self.total_steps or 1)
        warmup = self.warmup_steps * total if self.warmup_steps < 1 else self.warmup_steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length after construction and re-apply the current step's LR."""
        self.total_steps = int(total_steps)
        self._apply_current_lr()

    def _apply_current_lr(self) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self._factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the step counter comes from the checkpoint; warm-up, horizon, floor and peak LRs stay the
        config's, and the LR of the current step is recomputed from them (bit-identical when nothing changed)."""
        for key in RESUMED_SCHEDULER_KEYS:
            if key in state_dict:
                setattr(self, key, state_dict[key])
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base_lr
        self._apply_current_lr()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _resolve(fn: Any, what: str) -> Any:
    """A callable given as its dotted import path (how jsonargparse hands over a function default such as
    :func:`default_optimizer`) is imported."""
    if not isinstance(fn, str):
        return fn
    module, _, name = fn.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{what}: cannot import {fn!r}") from None


def build_optimizer(params, optimizer_fn, scheduler_fn) -> tuple[Optimizer, Any]:
    """The injected optimiser over ``params`` and its scheduler; a bad setting (a negative learning rate, a
    warm-up below zero) is a one-line :class:`ConfigError` naming it."""
    optimizer_fn, scheduler_fn = _resolve(optimizer_fn, "model.optimizer"), _resolve(scheduler_fn, "model.scheduler")
    try:
        optimizer = optimizer_fn(params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.optimizer: {_first_line(err)}") from err
    try:
        scheduler = scheduler_fn(optimizer)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.scheduler: {_first_line(err)}") from err
    return optimizer, scheduler


def check_optimizer_settings(optimizer_fn, scheduler_fn) -> None:
    """Build the optimiser and scheduler once on a stand-in parameter: bad settings fail before the model is
    built (minutes for a 7B base), not after."""
    build_optimizer([torch.nn.Parameter(torch.zeros(1))], optimizer_fn, scheduler_fn)


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _keep_config_settings(config_groups: list[dict[str, Any]], optimizer: Optimizer) -> None:
    """After an optimiser loads a checkpoint: its settings go back to the config's (the current ``lr`` is the
    scheduler's business); the changes are printed in one line."""
    if len(config_groups) != len(optimizer.param_groups):
        return
    changes = []
    for config, group in zip(config_groups, optimizer.param_groups):
        for key, value in config.items():
            if key == "lr" or _comparable(group.get(key)) == _comparable(value):
                continue
            name = "lr (peak)" if key == "initial_lr" else key
            change = f"{name} {group.get(key)!r} -> {value!r}"
            if change not in changes:
                changes.append(change)
            group[key] = value
    if changes:
        rank_zero_only(print)(f"lit_ft: resume: optimizer settings from the config, not the checkpoint: "
                              f"{', '.join(changes)}")


def optimizer_and_schedule(params, optimizer_fn, scheduler_fn, total_steps: float) -> dict:
    """What ``configure_optimizers`` returns: the injected optimiser over ``params`` and a per-step scheduler.

    A scheduler whose ``total_steps`` is None learns it here from ``total_steps`` (the trainer's
    ``estimated_stepping_batches``; 1000 when that is infinite). On resume the optimiser keeps these settings
    (see the module docstring).
    """
    optimizer, scheduler = build_optimizer(params, optimizer_fn, scheduler_fn)
    if getattr(scheduler, "total_steps", 0) is None:
        scheduler.set_total_steps(total_steps if math.isfinite(total_steps) else UNBOUNDED_HORIZON)
    config_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.register_load_state_dict_post_hook(partial(_keep_config_settings, config_groups))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
