"""A torch.profiler window over a few training batches: a Chrome trace and a top-operators table in the run
directory, and the table logged to W&B.

Outside the window nothing is profiled and nothing is synchronised. The window's first batch is a profiler
warm-up and is not recorded (torch.profiler's ``warmup``); open the trace at https://ui.perfetto.dev or
chrome://tracing (both read the gzipped file).
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from torch.profiler import ProfilerActivity, profile, schedule


class ProfilerWindow(L.Callback):
    """Profiles training batches ``start_batch`` .. ``start_batch + num_batches - 1`` (counted from 0 in this fit).

    Args:
        start_batch: first recorded batch (5: after CUDA/cuBLAS/allocator warm-up; one batch before it warms the
            profiler up). Negative disables the window.
        num_batches: batches recorded (2: enough to see a whole step and the boundary between two).
        dirpath: where ``profiler/`` goes (None: the run directory, ``trainer.log_dir``).
        row_limit: operators in the top-operators table (25).
        record_shapes: record input shapes (off: larger traces; turn on to tell matmul shapes apart).
        profile_memory: record allocations in the trace (off: slows the profiled steps noticeably).
        with_stack: record Python stacks (off: much larger traces).
    """

    def __init__(self, start_batch: int = 5, num_batches: int = 2, dirpath: str | None = None,
                 row_limit: int = 25, record_shapes: bool = False, profile_memory: bool = False,
                 with_stack: bool = False):
        self.start_batch = start_batch
        self.num_batches = num_batches
        self.dirpath = dirpath
        self.row_limit = row_limit
        self.record_shapes = record_shapes
        self.profile_memory = profile_memory
        self.with_stack = with_stack
        self._prof: profile | None = None
        self._batches = 0
        self.trace_path: Path | None = None
        self.table_path: Path | None = None

    def _out_dir(self, trainer: L.Trainer) -> Path:
        root = self.dirpath or trainer.log_dir or trainer.default_root_dir
        version = None
        for logger in trainer.loggers:
            version = getattr(logger, "version", None)
            if version is not None:
                break
        name = f"version_{version}" if isinstance(version, int) else (str(version) if version else "run")
        return Path(root) / "profiler" / name

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.start_batch < 0 or self._prof is not None or self._batches != max(self.start_batch - 1, 0):
            return
        warmup = 1 if self.start_batch > 0 else 0
        activities = [ProfilerActivity.CPU]
        if pl_module.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities,
                             schedule=schedule(wait=0, warmup=warmup, active=self.num_batches, repeat=1),
                             on_trace_ready=lambda prof: self._export(trainer, prof),
                             record_shapes=self.record_shapes, profile_memory=self.profile_memory,
                             with_stack=self.with_stack)
        self._prof.start()
        self._remaining = warmup + self.num_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        if self._prof is None or self._remaining <= 0:
            return
        self._remaining -= 1
        self._prof.step()  # the step after the last active one hands the trace to _export
        if self._remaining == 0:
            self._prof.stop()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._prof is not None and self._remaining > 0:  # the run ended inside the window
            self._prof.stop()
            self._remaining = 0

    def _export(self, trainer: L.Trainer, prof: profile) -> None:
        if not trainer.is_global_zero:
            return
        out = self._out_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        first = self.start_batch
        raw = out / f"trace_batches_{first}-{first + self.num_batches - 1}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(str(raw) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
        self.trace_path = Path(str(raw) + ".gz")
        cuda = any(a == ProfilerActivity.CUDA for a in prof.activities)
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        averages = prof.key_averages()
        table = averages.table(sort_by=sort_by, row_limit=self.row_limit)
        self.table_path = out / "top_operators.txt"
        self.table_path.write_text(table)
        rows = self._rows(averages, cuda)
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):  # W&B
                logger.log_table(key="profiler/top_operators", columns=["operator", "calls", "self_cpu_ms",
                                                                         "cpu_total_ms", "self_device_ms"],
                                 data=rows)
        print(f"profiler: batches {first}-{first + self.num_batches - 1} -> {self.trace_path} and {self.table_path}")

    def _rows(self, averages: Any, cuda: bool) -> list[list[Any]]:
        def device_time(event: Any) -> float:
            value = getattr(event, "self_device_time_total", None)
            if value is None:
                value = getattr(event, "self_cuda_time_total", 0.0)
            return float(value or 0.0) / 1e3

        events = sorted(averages, key=lambda e: device_time(e) if cuda else e.self_cpu_time_total, reverse=True)
        return [[e.key, int(e.count), e.self_cpu_time_total / 1e3, e.cpu_time_total / 1e3, device_time(e)]
                for e in events[: self.row_limit]]

