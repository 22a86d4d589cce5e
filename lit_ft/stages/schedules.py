"""Learning-rate schedules, injected into the modules as callables (``scheduler.class_path`` in the YAML)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from lit_ft.backbone.builder import LoraSettings


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
            fills it in before the first step).
        min_lr_ratio: final LR as a fraction of the peak (0.0: plain cosine to zero, as in the QLoRA recipe).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: float = 0.03,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
    ):
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
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self._factor(self.last_epoch)


LR_RATIO = "lr_ratio"  # a parameter group's multiple of the optimiser's learning rate (LoRA+'s B matrices)


def lora_param_groups(module: torch.nn.Module, lora: LoraSettings | None = None) -> list:
    """The trainable parameters of ``module``, for every stage's optimiser: one list, or with LoRA+ (Hayou et al.
    2024, ``lora.loraplus_lr_ratio`` set) two parameter groups, the LoRA B matrices at ``loraplus_lr_ratio`` x the
    learning rate and everything else (A matrices, DoRA magnitudes, score and value heads) at the learning rate.

    The paper's rule is about B and A alone; PEFT's ``create_loraplus_optimizer`` also puts every 1-D parameter
    (biases, DoRA magnitudes) in B's group. Here a head's bias keeps the learning rate its weight has.
    """
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    loraplus_lr_ratio = getattr(lora, "loraplus_lr_ratio", None)
    if loraplus_lr_ratio is None:
        return [p for _, p in trainable]
    b = [p for name, p in trainable if ".lora_B." in name or ".lora_embedding_B." in name]
    b_ids = {id(p) for p in b}
    rest = [p for _, p in trainable if id(p) not in b_ids]
    groups = [{"params": rest, "name": "lora_A+rest"}, {"params": b, "name": "lora_B", LR_RATIO: loraplus_lr_ratio}]
    return [g for g in groups if g["params"]]


def optimizer_and_schedule(params, optimizer_fn, scheduler_fn, total_steps: float) -> dict:
    """What ``configure_optimizers`` returns: the injected optimiser over ``params`` (a list of parameters, or
    parameter groups from :func:`lora_param_groups`) and a per-step scheduler.

    A group with an ``lr_ratio`` trains at that multiple of the optimiser's learning rate, set before the
    scheduler is made, so that the scheduler starts from it and scales every group alike.

    A scheduler whose ``total_steps`` is None learns it here from ``total_steps`` (the trainer's
    ``estimated_stepping_batches``; 1000 when that is infinite).
    """
    optimizer = optimizer_fn(params)
    for group in optimizer.param_groups:
        if LR_RATIO in group:
            group["lr"] = group["lr"] * group[LR_RATIO]
    scheduler = scheduler_fn(optimizer)
    if getattr(scheduler, "total_steps", 0) is None:
        scheduler.set_total_steps(total_steps if math.isfinite(total_steps) else 1000)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
