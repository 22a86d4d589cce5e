"""Memory: peak allocated and reserved device memory per logging interval (CUDA), or process RSS (CPU), with the
estimator's prediction (lit_ft.tools.estimate) printed beside the measured peak after the first steps.

``torch.cuda.max_memory_allocated``/``reserved`` and ``reset_peak_memory_stats`` read the caching allocator's host-
side counters: no device synchronisation. Paged optimiser state (bitsandbytes ``Paged*``) lives in unified memory
outside those counters, so it is compared separately.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict
from typing import Any

import lightning as L
import torch

from lit_ft.tools.estimate import setup_from_config
from lit_ft.tools.memory_model import GIB, MemoryEstimate, ModelShape, estimate, meta_model


def process_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def estimate_for_run(trainer: Any, pl_module: Any) -> MemoryEstimate | None:
    """The estimate for a running fit: the live model's config, its data module and its optimiser.

    None when the module has no ``backbone``/``model`` (not a lit_ft stage).
    """
    backbone, model = getattr(pl_module, "backbone", None), getattr(pl_module, "model", None)
    if backbone is None or model is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hparams = {k: v for k, v in dict(pl_module.hparams).items() if k != "backbone"}
    optimizer: dict[str, Any] = {"class_path": "torch.optim.AdamW"}
    if trainer.optimizers:
        opt = trainer.optimizers[0]
        optimizer = {"class_path": f"{type(opt).__module__}.{type(opt).__name__}",
                     "init_args": {"momentum": opt.param_groups[0].get("momentum", 0.0)}}
    datamodule = getattr(trainer, "datamodule", None)
    config = {
        "model": {"class_path": f"{type(pl_module).__module__}.{type(pl_module).__name__}",
                  "init_args": {**hparams, "backbone": asdict(backbone), "optimizer": optimizer}},
        "data": {"init_args": dict(getattr(datamodule, "hparams", {}) or {})},
        "trainer": {"precision": str(trainer.precision)},
    }
    setup, _ = setup_from_config(config)
    shape = ModelShape.from_hf(base.config, "live model")
    if type(pl_module).__name__ in ("RewardModel", "PPO"):
        setup.head_params = shape.hidden_size + 1
    return estimate(shape, setup, meta_model(base.config))


class MemoryMonitor(L.Callback):
    """Logs ``memory/*`` every ``log_every_n_steps`` optimizer steps; compares with the estimate once.

    Args:
        log_every_n_steps: optimizer steps between logs (None: the trainer's ``log_every_n_steps``).
        compare_after_batches: training batches after which the measured peak is printed beside the estimate
            (3: the optimiser state exists after the first step, and activations peak in every step).
        estimate: compute the estimate at the start of training (False skips building the meta model).
    """

    def __init__(self, log_every_n_steps: int | None = None, compare_after_batches: int = 3, estimate: bool = True):
        self.log_every_n_steps = log_every_n_steps
        self.compare_after_batches = compare_after_batches
        self.do_estimate = estimate
        self.estimate: MemoryEstimate | None = None
        self.run_peak_allocated = 0
        self.run_peak_reserved = 0
        self.comparison: dict[str, float] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        self._cuda = pl_module.device.type == "cuda"
        self._last_step = trainer.global_step
        self._batches = 0
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        if self.do_estimate:
            try:
                self.estimate = estimate_for_run(trainer, pl_module)
            except Exception as err:  # noqa: BLE001  the estimate is advice: never stop a run for it
                print(f"memory: no estimate ({type(err).__name__}: {err})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        step = trainer.global_step
        metrics = None
        if step // self._every > self._last_step // self._every:
            metrics = self._interval_metrics(pl_module.device)
            self._last_step = step
        if self._batches == self.compare_after_batches:
            metrics = {**(metrics or self._interval_metrics(pl_module.device)), **self._compare(trainer)}
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _interval_metrics(self, device: torch.device) -> dict[str, float]:
        if not self._cuda:
            return {"memory/rss_gib": process_rss() / GIB, "memory/peak_rss_gib": peak_rss() / GIB}
        allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        self.run_peak_allocated = max(self.run_peak_allocated, allocated)
        self.run_peak_reserved = max(self.run_peak_reserved, reserved)
        torch.cuda.reset_peak_memory_stats(device)
        return {"memory/peak_allocated_gib": allocated / GIB, "memory/peak_reserved_gib": reserved / GIB}

    def _compare(self, trainer: L.Trainer) -> dict[str, float]:
        """Print and return the measured peak beside the estimate (CUDA) or the RSS beside it (CPU)."""
        est = self.estimate
        if self._cuda:
            measured, label = self.run_peak_allocated, "peak allocated"
        else:
            measured, label = peak_rss(), "peak RSS (includes the Python/torch runtime and the data)"
        self.comparison = {"memory/measured_gib": measured / GIB}
        line = f"memory after {self._batches} batches: {label} {measured / GIB:.2f} GiB"
        if est is not None:
            self.comparison["memory/estimate_allocated_gib"] = est.allocated / GIB
            line += f"; estimate {est.allocated / GIB:.2f} GiB allocated"
            if est.paged:
                line += f" + {est.paged / GIB:.2f} GiB paged optimiser state"
            if self._cuda and est.allocated:
                self.comparison["memory/estimate_ratio"] = measured / est.allocated
                line += f" (measured/estimate {measured / est.allocated:.2f})"
        if trainer.is_global_zero:
            print(line)
        return self.comparison

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One summary line: the run's peak (CUDA allocated and reserved, or the process's peak RSS) and the
        estimate beside it (bench/gpu_check.py reads this line)."""
        if self._cuda:
            self._interval_metrics(pl_module.device)
        if self.comparison is None and self._batches:  # a run shorter than compare_after_batches
            metrics = self._compare(trainer)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if not trainer.is_global_zero:
            return
        est = self.estimate
        if self._cuda:
            line = (f"memory: run peak allocated {self.run_peak_allocated / GIB:.2f} GiB, "
                    f"reserved {self.run_peak_reserved / GIB:.2f} GiB")
        else:
            line = f"memory: peak RSS {peak_rss() / GIB:.2f} GiB"
        if est is not None:
            line += f"; estimate {est.allocated / GIB:.2f} GiB allocated"
            if est.paged:
                line += f" + {est.paged / GIB:.2f} GiB paged optimiser state"
            if self._cuda and est.allocated:
                line += f" (measured/estimate {self.run_peak_allocated / est.allocated:.2f})"
        print(line)
