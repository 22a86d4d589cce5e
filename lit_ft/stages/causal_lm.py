"""Causal-LM LightningModule: pre-training (every parameter, loss on every token) and SFT (LoRA, masked prompts).

The module stays thin: the loss is :func:`lit_ft.losses.lm.supervised_token_loss`, the noise is
:mod:`lit_ft.backbone.neftune`, the model comes from :mod:`lit_ft.backbone`.

Loss normalisation. The training loss of an optimizer step is the summed token cross-entropy over every
supervised token of the step, divided by the number of those tokens: across gradient accumulation and across DDP
ranks, not averaged per micro-batch (which over-weights short micro-batches: Lightning #20350). Each micro-batch
back-propagates its *sum*; just before the optimizer step (and before gradient clipping) the gradients are
rescaled by ``accumulate_grad_batches * world_size / supervised_tokens_in_step`` (Lightning divides by the first
and DDP averages over the second).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from lit_ft.backbone import (
    Backbone,
    BackboneModule,
    build_model,
    decoder_and_head,
    save_adapter,
    save_full_model,
)
from lit_ft.backbone.neftune import NEFTune
from lit_ft.losses.lm import DEFAULT_CHUNK_SIZE, supervised_token_loss
from lit_ft.padding import example_lengths_from_attention_mask, example_lengths_from_position_ids
from lit_ft.stages.run_contract import CheckpointContract
from lit_ft.stages.schedules import WarmupCosine, default_optimizer, optimizer_and_schedule


class CausalLM(CheckpointContract, BackboneModule, L.LightningModule):
    """Causal language modelling on the shared backbone: SFT with LoRA, or pre-training with ``lora: null``.

    Args:
        backbone: where the model comes from, its precision/quantisation and its LoRA adapter.
        optimizer: a callable making the optimiser from the trainable parameters (AdamW by default;
            ``bitsandbytes.optim.AdamW8bit`` or ``bitsandbytes.optim.PagedAdamW`` are drop-in choices).
        scheduler: a callable making the LR scheduler from the optimiser (warm-up + cosine by default).
        neftune_alpha: NEFTune noise scale (0: off; 5 is the paper's usual value). Noise per packed example.
        loss_chunk_size: supervised positions projected through the output head at once (1024: lit_ft.losses.lm's
            DEFAULT_CHUNK_SIZE, a 1024 x vocab logits buffer; docs/memory.md).
        export_dir: where to write the final adapter (PEFT format) or, without LoRA, the full model.
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = WarmupCosine,
        neftune_alpha: float = 0.0,
        loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])  # callables: the CLI config keeps them
        self.backbone = backbone or Backbone()
        self.optimizer_fn = optimizer
        self.scheduler_fn = scheduler
        self.neftune = NEFTune(neftune_alpha)
        self.loss_chunk_size = loss_chunk_size
        self.export_dir = export_dir
        self._tokenizer = None
        self.model: torch.nn.Module | None = None
        self.val_loss = MeanMetric()
        self._step_loss_sum = 0.0
        self._step_tokens = 0

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the model once (idempotent: Lightning may call this more than once)."""
        if self.model is not None:
            return
        self.model = build_model(self.load_spec(), self.tokenizer, device_map=self.quantized_device_map())
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps submodule modes as found
        self.neftune.attach(self.model.get_input_embeddings())

    @property
    def stage(self) -> str:
        """The run-record stage (:mod:`lit_ft.stages.run_contract`): pre-training trains every weight, SFT LoRA."""
        return "sft" if self.backbone.lora is not None else "pretrain"

    @property
    def adapter_name(self) -> str | None:
        return self.backbone.lora.adapter_name if self.backbone.lora is not None else None

    def forward_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states of the last layer; packed rows carry no attention mask, only restarting position ids."""
        decoder, _ = decoder_and_head(self.model)
        if self.training and self.neftune.alpha > 0:
            if "attention_mask" in batch:
                self.neftune.lengths = example_lengths_from_attention_mask(batch["attention_mask"])
            else:
                self.neftune.lengths = example_lengths_from_position_ids(batch["position_ids"])
        out = decoder(
            input_ids=batch["input_ids"],
            position_ids=batch.get("position_ids"),
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
        )
        return out.last_hidden_state

    def token_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over supervised tokens and their count."""
        _, head = decoder_and_head(self.model)
        hidden = self.forward_hidden(batch)
        return supervised_token_loss(hidden, head, batch["labels"], self.loss_chunk_size)

    # --------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n_tokens = self.token_loss(batch)
        self._step_loss_sum += loss_sum.detach()
        self._step_tokens += n_tokens
        return loss_sum

    def on_before_optimizer_step(self, optimizer) -> None:
        tokens = torch.as_tensor(self._step_tokens, device=self.device, dtype=torch.float32)
        loss_sum = torch.as_tensor(self._step_loss_sum, device=self.device, dtype=torch.float32)
        if self.trainer.world_size > 1:
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
            loss_sum = self.trainer.strategy.reduce(loss_sum, reduce_op="sum")
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens.clamp(min=1)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self.log("train/loss", loss_sum / tokens.clamp(min=1), prog_bar=True, rank_zero_only=True)
        self.log("train/supervised_tokens", tokens, rank_zero_only=True)
        self.log("lr", optimizer.param_groups[0]["lr"], rank_zero_only=True)
        self._step_loss_sum, self._step_tokens = 0.0, 0

    # ------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_tokens = self.token_loss(batch)
        if n_tokens > 0:
            self.val_loss.update(loss_sum / n_tokens, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", torch.exp(loss.clamp(max=30.0)))

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return optimizer_and_schedule(params, self.optimizer_fn, self.scheduler_fn,
                                      self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------ export
    # (checkpoint hooks: CheckpointContract keeps trainable parameters only and checks a resume against the config)
    def export(self, directory: str) -> str:
        """Write the adapter in PEFT format, or the whole model when every parameter was trained."""
        if self.adapter_name is not None:
            return str(save_adapter(self.model, directory, self.adapter_name, self.tokenizer, self.base_record()))
        meta = {"stage": "pretrain", "global_step": self.global_step}
        return str(save_full_model(self.model, directory, self.tokenizer, metadata=meta))

    def on_train_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            path = self.export(self.export_dir)
            print(f"lit_ft: saved {'adapter' if self.adapter_name else 'model'} to {path}")
