"""Stop on a NaN or infinite loss with one line naming the step and the last good checkpoint, or skip such steps.

The check sits between the backward pass and the optimizer step, so a bad step never reaches the weights: the
run stops before anything non-finite is written, and the checkpoints on disk stay as they were. It watches every
loss that is back-propagated (``on_before_backward``: each micro-batch under automatic optimisation, each
``manual_backward`` in PPO) and the gradients themselves (a finite loss can still give an infinite gradient).

With ``max_skipped_steps > 0`` a bad step is skipped instead: its gradients are dropped (set to None, so AdamW
leaves those parameters and their moments untouched), the LR schedule and the step counter still advance, and a
warning names the step. The run stops once more than ``max_skipped_steps`` steps have been skipped. Under DDP the
gradients are already averaged across ranks when the check runs, so every rank takes the same decision. With
fp16 mixed precision (a GradScaler), overflowing gradients are left to the scaler and only the loss is checked.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_ft.errors import ConfigError, UserError


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss or gradient (a user error, so ``lit-ft`` prints one line)."""


def last_checkpoint(trainer: L.Trainer) -> tuple[str, int] | None:
    """The most recent checkpoint the run wrote (path, global step), from its checkpoint callbacks."""
    found: list[tuple[int, str]] = []
    for callback in trainer.checkpoint_callbacks:
        step = getattr(callback, "_last_global_step_saved", -1)
        path = getattr(callback, "_last_checkpoint_saved", "") or getattr(callback, "last_model_path", "")
        if path and step >= 0:
            found.append((step, path))
    if not found:
        return None
    step, path = max(found)
    return path, step


def _first_non_finite(losses: list[torch.Tensor], optimizer: torch.optim.Optimizer, check_grads: bool) -> str | None:
    """What is non-finite in this step, or None; one device sync for all the losses and gradients together."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = grads if check_grads else []
    flags = [torch.isfinite(t).all().reshape(1) for t in losses + grads]
    if not flags or bool(torch.cat([f.to(flags[0].device) for f in flags]).all()):
        return None
    bad_loss = next((float(t.float().sum()) for t in losses if not torch.isfinite(t).all()), None)
    return f"non-finite loss ({bad_loss})" if bad_loss is not None else "non-finite gradients"


class NonFiniteGuard(L.Callback):
    """Stop (default) or skip optimizer steps whose loss or gradients are NaN or infinite.

    Args:
        max_skipped_steps: bad steps to skip before stopping (0: stop at the first, with the last good
            checkpoint named; a few skipped steps can rescue a long run from rare fp16 overflows or a bad batch).
    """

    def __init__(self, max_skipped_steps: int = 0):
        if max_skipped_steps < 0:
            raise ConfigError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0
        self._losses: list[torch.Tensor] = []  # this step's back-propagated losses, checked at the optimizer step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        losses, self._losses = self._losses, []
        # fp16 mixed precision: overflowing gradients are the GradScaler's to skip (it lowers the scale); only
        # a non-finite loss counts then.
        check_grads = getattr(trainer.precision_plugin, "scaler", None) is None
        what = _first_non_finite(losses, optimizer, check_grads)
        if what is None:
            return
        step = trainer.global_step + 1  # the step being taken, counted from 1 like the logs
        if self.skipped_steps < self.max_skipped_steps:
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            rank_zero_warn(f"{what} at step {step}: step skipped "
                           f"({self.skipped_steps} of at most {self.max_skipped_steps})")
            pl_module.log("train/skipped_steps", float(self.skipped_steps), rank_zero_only=True)
            return
        saved = last_checkpoint(trainer)
        where = f"last good checkpoint: {saved[0]} (step {saved[1]})" if saved else "no checkpoint was written yet"
        skipped = f" after skipping {self.skipped_steps} steps" if self.skipped_steps else ""
        hint = "" if self.max_skipped_steps else " (NonFiniteGuard.max_skipped_steps skips such steps instead)"
        raise NonFiniteLossError(f"{what} at step {step}{skipped}: training stopped; {where}{hint}")

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
