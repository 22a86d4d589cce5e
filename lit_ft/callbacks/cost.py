"""Cost: elapsed device-hours times a $/hour, and a projection of the whole configured run from the measured pace.

The projection: total optimizer steps (``trainer.estimated_stepping_batches``: ``max_steps``, or epochs times the
batches of an epoch) x the measured seconds per optimizer step since warm-up (validation included in proportion),
plus the start-up time before the first batch. With the data module's token counts it also says how many epochs
and tokens that run covers. Host-side wall clock only: no device synchronisation.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L

from lit_ft.loggers.run_dir import COST_FILE, write_json

# AWS on-demand prices (us-east-1) of the two instances the seed recipe compares, one A10G 24 GB each.
DEFAULT_PRICES = {"g5.4xlarge": 0.6942, "g5.8xlarge": 0.9331}


class CostTracker(L.Callback):
    """Logs ``cost/*`` and prints elapsed and projected device-hours and dollars.

    Args:
        prices: $/hour per device, by instance name (default: g5.4xlarge 0.6942, g5.8xlarge 0.9331, the seed
            recipe's comparison); each gets its own cost line.
        warmup_steps: optimizer steps left out of the measured pace (3: the first steps carry one-off CUDA,
            allocator and compilation costs).
        project_after_steps: optimizer steps after which the projection is first printed (20), besides the end.
        log_every_n_steps: optimizer steps between ``cost/*`` logs (None: the trainer's ``log_every_n_steps``).
    """

    def __init__(self, prices: dict[str, float] | None = None, warmup_steps: int = 3, project_after_steps: int = 20,
                 log_every_n_steps: int | None = None):
        self.prices = dict(DEFAULT_PRICES if prices is None else prices)
        self.warmup_steps = warmup_steps
        self.project_after_steps = project_after_steps
        self.log_every_n_steps = log_every_n_steps
        self.projection: dict[str, float] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._first_batch: float | None = None
        self._pace_start: tuple[float, int] | None = None
        self._projected_once = False
        self._every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        self._last_step = trainer.global_step
        self._start_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._first_batch is None:
            self._first_batch = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        self._pace_end = (time.perf_counter(), step)  # the pace ends at a batch: end-of-fit evaluation is not in it
        if self._pace_start is None and step - self._start_step >= self.warmup_steps:
            self._pace_start = self._pace_end
        if step // self._every > self._last_step // self._every:
            self._last_step = step
            metrics = self._elapsed_metrics(trainer)
            if not self._projected_once and step - self._start_step >= self.project_after_steps:
                self._projected_once = True
                projection = self.project(trainer)
                if projection:
                    metrics.update(projection)
                    self._print(trainer, "projected", projection)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self._elapsed_metrics(trainer)
        projection = self.project(trainer) or {}
        metrics.update(projection)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        hours = metrics["cost/elapsed_device_hours"]
        write_json(trainer, COST_FILE, {"devices": self._devices(trainer), "prices": self.prices,
                                        **{key.removeprefix("cost/"): value for key, value in metrics.items()}})
        if trainer.is_global_zero:
            costs = ", ".join(f"${hours * price:.4f} on {name} (${price}/h)" for name, price in self.prices.items())
            print(f"cost: {hours * 3600:.0f} s x {self._devices(trainer)} device(s) = {hours:.4f} device-hours"
                  + (f": {costs}" if costs else ""))
            if projection:
                self._print(trainer, "whole configured run", projection)

    # ------------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _devices(trainer: L.Trainer) -> int:
        return max(1, trainer.num_devices * trainer.num_nodes)

    def _elapsed_metrics(self, trainer: L.Trainer) -> dict[str, float]:
        hours = (time.perf_counter() - self._fit_start) / 3600 * self._devices(trainer)
        metrics = {"cost/elapsed_device_hours": hours}
        for name, price in self.prices.items():
            metrics[f"cost/usd_{name}"] = hours * price
        return metrics

    def project(self, trainer: L.Trainer) -> dict[str, float] | None:
        """Projected device-hours and dollars of the whole configured run, or None before the pace is known."""
        if self._pace_start is None or self._first_batch is None:
            return None
        (start, first_step), (end, last_step) = self._pace_start, self._pace_end
        if last_step <= first_step:
            return None
        per_step = (end - start) / (last_step - first_step)
        try:
            total_steps = int(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001  (a loader without a length raises): fall back to max_steps
            total_steps = trainer.max_steps
        if total_steps is None or total_steps <= 0 or total_steps == float("inf"):
            return None
        startup = self._first_batch - self._fit_start
        seconds = startup + total_steps * per_step
        hours = seconds / 3600 * self._devices(trainer)
        out = {"cost/projected_total_steps": float(total_steps), "cost/projected_seconds_per_step": per_step,
               "cost/projected_device_hours": hours}
        for name, price in self.prices.items():
            out[f"cost/projected_usd_{name}"] = hours * price
        out.update(self._data_coverage(trainer, total_steps, seconds))
        return out

    @staticmethod
    def _data_coverage(trainer: L.Trainer, total_steps: int, seconds: float) -> dict[str, float]:
        """Epochs and tokens the projected run covers, from the data module's token statistics."""
        dm = getattr(trainer, "datamodule", None)
        stats = getattr(dm, "stats_train", None)
        rows, tokens = getattr(stats, "rows", None), getattr(stats, "tokens", None)
        batch = getattr(dm, "micro_batch_size", None)
        if not (rows and tokens and batch):
            return {}
        rows_per_step = batch * trainer.accumulate_grad_batches * trainer.world_size
        epochs = total_steps * rows_per_step / rows
        return {"cost/projected_epochs": epochs, "cost/dataset_tokens": float(tokens),
                "cost/projected_tokens_per_s": tokens * epochs / max(seconds, 1e-9)}

    def _print(self, trainer: L.Trainer, label: str, p: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        hours = p["cost/projected_device_hours"]
        costs = ", ".join(f"${hours * price:.2f} on {name}" for name, price in self.prices.items())
        data = ""
        if "cost/projected_epochs" in p:
            data = (f", {p['cost/projected_epochs']:.2f} epochs of {p['cost/dataset_tokens']:,.0f} tokens "
                    f"({p['cost/projected_tokens_per_s']:,.0f} tokens/s)")
        print(f"cost, {label}: {p['cost/projected_total_steps']:,.0f} steps x "
              f"{p['cost/projected_seconds_per_step']:.3f} s = {hours:.4f} device-hours"
              + (f": {costs}" if costs else "") + data)
