"""Throughput: real and supervised tokens per second, samples per second, step time, MFU, data-loader wait.

Counts come from the batch itself, on the device it lives on, accumulated in device tensors: nothing is read back
to the host until a logging step, where Lightning synchronises anyway. Batch layouts:

* packed SFT/pre-training rows: ``input_ids``, ``labels``, ``position_ids`` (no mask). Pad tokens (the pad id) may
  fill any slot's tail; a sample is a position-0 start on a real token.
* padded rows: ``attention_mask`` marks real tokens; one sample per row.
* reward-model pairs: ``input_ids``/``attention_mask`` of 2B rows plus ``margin`` (B): a sample is a pair.
* PPO prompts: ``input_ids``/``attention_mask``/``index``; tokens are prompt tokens, a sample a prompt, and MFU is
  not computed (sampling dominates and is not a matmul-bound step). PPO logs its sampled tokens itself
  (``throughput/response_tokens_per_s``).

Model FLOPs per step (PaLM's MFU convention: recomputation by gradient checkpointing is not counted):
    real_tokens * (4 * N_body + 2 * N_trainable_body)          forward, input grads, weight grads of trainables
    + supervised * (4 or 6) * V * h                             the head runs on supervised positions only
    + 12 * L * h_attn * sum(context)                            QK^T and PV, forward and backward
where sum(context) = sum over real tokens of (position_id + 1): exact causal work of packed or padded rows.

Peak FLOP/s: dense (no 2:4 sparsity) bf16/fp16 matmul rates with fp32 accumulation. Lightning's
``get_available_flops`` gives them for the devices it knows; :data:`PEAK_FLOPS` holds only those it lacks or gets
wrong (it reads "NVIDIA L40S" and "NVIDIA L40" as an L4, knows the H200 only by names the driver does not report,
and lists sparse figures for H200 and H100 NVL and the TF32 rate for GeForce cards), matched on whole words of
``torch.cuda.get_device_name()`` (lower case), in table order. ``peak_flops`` overrides both.
"""

from __future__ import annotations

import re
import time
from typing import Any

import lightning as L
import torch

from lit_ft.losses.lm import IGNORE_INDEX

# (whole-word pattern in the device name, bf16 FLOP/s, fp16 FLOP/s): what Lightning's table lacks or gets wrong.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    (r"l40s", 362e12, 362e12),  # L40S datasheet: 733 TFLOPS with sparsity (Lightning: an L4's 121)
    (r"l40", 181e12, 181e12),  # L40 datasheet: 362 with sparsity (Lightning: an L4's 121)
    (r"h200 nvl", 835e12, 835e12),  # H200 NVL datasheet: 1,671 with sparsity (Lightning: the sparse figure)
    (r"h200", 989e12, 989e12),  # H200 SXM datasheet: 1,979 with sparsity (Lightning: unknown name, sparse figure)
    (r"h100 nvl", 835e12, 835e12),  # H100 NVL datasheet: 1,671 with sparsity (Lightning: 1,979, sparse)
    (r"rtx 4090", 165.2e12, 165.2e12),  # Ada whitepaper, fp32 accumulate (Lightning: the TF32 rate, 82.6)
    (r"rtx 3090", 71e12, 71e12),  # GA102 whitepaper, fp32 accumulate (Lightning: the TF32 rate, 35.6)
    (r"a10", 125e12, 125e12),  # A10 datasheet (Lightning knows the A10G only)
]


def table_peak_flops(device_name: str, half_dtype: str = "bf16") -> float | None:
    """Peak dense FLOP/s of ``device_name`` from :data:`PEAK_FLOPS`, or None when the table does not hold it."""
    name = device_name.lower()
    for pattern, bf16, fp16 in PEAK_FLOPS:
        if re.search(rf"(?<![a-z0-9]){pattern}(?![a-z0-9])", name):
            return bf16 if half_dtype == "bf16" else fp16
    return None


def current_device_peak(precision: str, override: float | None = None) -> tuple[float | None, str]:
    """Peak FLOP/s of the current CUDA device for the trainer's precision (:data:`PEAK_FLOPS`, else Lightning's
    ``get_available_flops``; None when neither knows it), and the device's name."""
    if not torch.cuda.is_available():
        return override, "cpu"
    name = torch.cuda.get_device_name()
    if override is not None:
        return override, name
    half = "fp16" if str(precision).startswith("16") else "bf16"
    peak = table_peak_flops(name, half)
    if peak is None:
        from lightning.fabric.utilities.throughput import get_available_flops

        device = torch.device("cuda", torch.cuda.current_device())
        peak = get_available_flops(device, torch.float16 if half == "fp16" else torch.bfloat16)
    return (float(peak) if peak else None), name


def model_flop_counts(model: torch.nn.Module) -> dict[str, float]:
    """Matmul parameter counts of a (PEFT-wrapped) causal LM: body, trainable body, head, and attention sizes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    body = trainable = 0
    for module in base.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            n = module.in_features * module.out_features
            body += n
            if module.weight.requires_grad:
                trainable += n
    config = base.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"body": body, "trainable": trainable, "head": head.in_features * head.out_features if head else 0,
            "head_trainable": float(bool(head is not None and head.weight.requires_grad)),
            "layers": config.num_hidden_layers, "attn_width": heads * head_dim}


def batch_counts(batch: dict[str, Any], pad_id: int | None) -> dict[str, torch.Tensor | int]:
    """Real tokens, supervised tokens, samples and causal context of one batch: 0-d tensors on the batch's
    device (never read back here), or plain ints where the shape alone tells (no host-to-device copy either)."""
    ids = batch["input_ids"]
    if "attention_mask" in batch:
        real = batch["attention_mask"].bool()
    elif pad_id is not None:
        real = ids != pad_id
    else:
        real = torch.ones_like(ids, dtype=torch.bool)
    positions = batch.get("position_ids")
    if positions is None:
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    if "margin" in batch:  # reward-model pairs: 2B rows, B pairs
        samples = batch["margin"].numel()
    elif "attention_mask" in batch or "labels" not in batch:
        samples = ids.shape[0]
    else:  # packed: each example starts at position 0 on a real token
        samples = ((positions == 0) & real).sum()
    labels = batch.get("labels")
    supervised = (labels[:, 1:] != IGNORE_INDEX).sum() if labels is not None else 0
    return {"tokens": real.sum(), "supervised": supervised, "samples": samples,
            "context": ((positions + 1) * real).sum()}


class ThroughputMonitor(L.Callback):
    """Logs ``throughput/*`` every ``log_every_n_steps`` optimizer steps and prints a summary at the end.

    Args:
        log_every_n_steps: optimizer steps between logs (None: the trainer's ``log_every_n_steps``, so that
            the read-back coincides with Lightning's own logging sync).
        peak_flops: the device's peak FLOP/s for MFU (None: PEAK_FLOPS or Lightning's table, by device name).
        skip_first_steps: optimizer steps left out of the end-of-run summary (2: CUDA/cuBLAS warm-up).
    """

    def __init__(self, log_every_n_steps: int | None = None, peak_flops: float | None = None,
                 skip_first_steps: int = 2):
        self.log_every_n_steps = log_every_n_steps
        self.peak_flops_override = peak_flops
        self.skip_first_steps = skip_first_steps
        self.history: list[dict[str, float]] = []
        self._reset_interval(None)

    def _reset_interval(self, device: torch.device | None) -> None:
        self._sums = None if device is None else torch.zeros(4, dtype=torch.float64, device=device)
        self._host = [0.0] * 4
        self._batches = 0
        self._data_wait = 0.0
        self._interval_start = time.perf_counter()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        self._peak, self.device_name = current_device_peak(trainer.precision, self.peak_flops_override)
        model = getattr(pl_module, "model", None)
        has_head = isinstance(model, torch.nn.Module) and hasattr(model, "get_output_embeddings")
        self._flops = model_flop_counts(model) if has_head else None
        self._pad_id = getattr(getattr(pl_module, "tokenizer", None), "pad_token_id", None)
        self._manual = not pl_module.automatic_optimization
        self._head_used = hasattr(pl_module, "loss_chunk_size")  # causal LM: head on supervised positions
        self._last_step = trainer.global_step
        self._last_batch_end: float | None = None
        self._reset_interval(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self._data_wait += now - self._last_batch_end
        if isinstance(batch, dict) and "input_ids" in batch:
            counts = batch_counts(batch, self._pad_id)
            device = counts["tokens"].device
            if self._sums is None or self._sums.device != device:
                self._sums = torch.zeros(4, dtype=torch.float64, device=device)
            for i, key in enumerate(("tokens", "supervised", "samples", "context")):
                if isinstance(counts[key], torch.Tensor):
                    self._sums[i] += counts[key]  # an asynchronous kernel: no read-back
                else:
                    self._host[i] += counts[key]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        step = trainer.global_step
        if step // self._every > self._last_step // self._every or trainer.should_stop:
            self._log_interval(trainer, step)
            self._last_step = step
        self._last_batch_end = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batches:
            self._log_interval(trainer, trainer.global_step)
        summary = self.summary()
        if summary and trainer.is_global_zero:
            mfu = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""
            print(f"throughput: {summary['tokens_per_s']:,.0f} tokens/s ({summary['supervised_per_s']:,.0f} "
                  f"supervised), {summary['samples_per_s']:.2f} samples/s, {summary['step_s'] * 1e3:.0f} ms/batch, "
                  f"data wait {summary['data_wait_share']:.1%}{mfu} on {self.device_name}")

    # --------------------------------------------------------------- metrics
    def _log_interval(self, trainer: L.Trainer, step: int) -> None:
        elapsed = max(time.perf_counter() - self._interval_start, 1e-9)
        device_sums = self._sums.tolist() if self._sums is not None else [0.0] * 4  # the one read-back
        tokens, supervised, samples, context = (a + b for a, b in zip(device_sums, self._host))
        metrics = {
            "throughput/tokens_per_s": tokens / elapsed,
            "throughput/supervised_tokens_per_s": supervised / elapsed,
            "throughput/samples_per_s": samples / elapsed,
            "throughput/step_time_s": elapsed / max(self._batches, 1),
            "throughput/data_wait_share": min(self._data_wait / elapsed, 1.0),
        }
        flops = self._model_flops(tokens, supervised, context)
        if flops is not None:
            world = trainer.world_size
            metrics["throughput/tflops_per_s"] = flops / elapsed / 1e12
            if self._peak:
                metrics["throughput/mfu"] = flops / (elapsed * self._peak * world)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history.append({"step": step, "elapsed": elapsed, "batches": self._batches, "tokens": tokens,
                             "supervised": supervised, "samples": samples, "flops": flops or 0.0,
                             "data_wait": self._data_wait})
        self._reset_interval(self._sums.device if self._sums is not None else None)

    def _model_flops(self, tokens: float, supervised: float, context: float) -> float | None:
        """Model FLOPs of the interval (formula in the module docstring); None for PPO or an unknown model."""
        if self._flops is None or self._manual:
            return None
        f = self._flops
        total = tokens * (4 * f["body"] + 2 * f["trainable"]) + 12 * f["layers"] * f["attn_width"] * context
        if self._head_used:
            total += supervised * (4 + 2 * f["head_trainable"]) * f["head"]
        return total

    def summary(self) -> dict[str, float] | None:
        """Means over the logged intervals after ``skip_first_steps``, or None before any interval."""
        rows = [r for r in self.history if r["step"] > self.skip_first_steps] or self.history
        if not rows:
            return None
        elapsed = sum(r["elapsed"] for r in rows)
        total = {k: sum(r[k] for r in rows) for k in ("batches", "tokens", "supervised", "samples", "flops",
                                                      "data_wait")}
        out = {"tokens_per_s": total["tokens"] / elapsed, "supervised_per_s": total["supervised"] / elapsed,
               "samples_per_s": total["samples"] / elapsed, "step_s": elapsed / max(total["batches"], 1),
               "data_wait_share": total["data_wait"] / elapsed, "mfu": None}
        if total["flops"] and self._peak:
            out["mfu"] = total["flops"] / (elapsed * self._peak)
        return out
