"""The training progress bar: Lightning's rich bar, described by what bounds the run.

lit_ft's stages are bounded by ``trainer.max_steps``; Lightning then sets ``max_epochs`` to -1 (no epoch bound),
and its rich bar describes the training bar as ``Epoch 3/-2`` (``max_epochs - 1``). :class:`StepProgressBar` writes
``Epoch 3`` instead, ``Epoch 3/9`` under an epoch bound, and adds the optimizer step against ``max_steps``
(``step 120/500``), refreshed as the run goes. The CLI uses it whenever the progress bar is on and no other
progress bar is configured (``trainer.enable_progress_bar: false`` turns it off, as it turns off Lightning's).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def train_description(current_epoch: int, max_epochs: int | None, global_step: int, max_steps: int | None) -> str:
    """``Epoch 3 · step 120/500``: the epoch, with its bound when there is one (``max_epochs`` > 0), and the
    optimizer step with its bound when there is one (``max_steps`` > 0)."""
    text = f"Epoch {current_epoch}"
    if max_epochs is not None and max_epochs > 0:
        text += f"/{max_epochs - 1}"
    if max_steps is not None and max_steps > 0:
        text += f" · step {global_step}/{max_steps}"
    return text


class StepProgressBar(RichProgressBar):
    """Lightning's :class:`RichProgressBar` with :func:`train_description` as the training bar's description."""

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the description
        trainer = self.trainer
        text = train_description(current_epoch, trainer.max_epochs, trainer.global_step, trainer.max_steps)
        if len(self.validation_description) > len(text):  # as Lightning pads it: no flicker beside "Validation"
            text = f"{text:{len(self.validation_description)}}"
        return text

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.train_progress_bar_id is not None and self.progress is not None and not self.is_disabled:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))
