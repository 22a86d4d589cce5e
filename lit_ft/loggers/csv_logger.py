"""Local metrics beside W&B: Lightning's CSVLogger writing ``<save_dir>/metrics.csv``, continued on resume.

Lightning's own CSVLogger writes ``save_dir/name/version_N/metrics.csv``, picks a new version for every run,
buffers 100 steps before writing, and deletes an existing metrics file when it starts. This one:

- writes ``<save_dir>/metrics.csv`` (no name or version folders), so that a stage's metrics are always at
  ``runs/<stage>/metrics.csv`` beside its W&B folder, checkpoints and report;
- writes at every log call (``flush_logs_every_n_steps: 1``): a crash loses nothing that was logged;
- starts a fresh file for a fresh run, and continues the file of a resumed one: :meth:`CSVLogger.resume_at` (called
  by :class:`lit_ft.callbacks.report.RunReport` when a checkpoint is restored) keeps the rows the interrupted run
  logged before the checkpoint's step and drops the later ones, which the resumed run logs again.

One row per log call, with a ``step`` column; a metric logged at several calls of one step appears in several rows
(the report keeps the last value per step).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

METRICS_FILE = ExperimentWriter.NAME_METRICS_FILE  # "metrics.csv"


class _ContinuingWriter(ExperimentWriter):
    """Lightning's writer that neither warns about nor deletes an existing metrics file when created: the first
    write decides (fresh run: a new file), unless :meth:`resume_at` has continued the file first."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._started = False

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here, before resume is known
        return

    def resume_at(self, step: int) -> int:
        """Keep the existing rows logged before ``step``; later writes append. Returns the rows kept."""
        self._started = True
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return 0
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if _step_of(row) < step]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = header  # appends keep the file's columns (new ones rewrite the header, as Lightning's)
        return len(rows)

    def save(self) -> None:
        if not self._started and self.metrics:
            self._started = True
            if os.path.isfile(self.metrics_file_path):  # a fresh run in a used folder: start a new file
                os.remove(self.metrics_file_path)
        super().save()


def _step_of(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger writing ``<save_dir>/metrics.csv`` at every log call, continued on resume.

    Args:
        save_dir: the run directory (``runs/<stage>`` in the stage configs); ``metrics.csv`` and Lightning's
            ``hparams.yaml`` are written directly in it.
        flush_logs_every_n_steps: write every N log steps (1: nothing logged is lost on a crash; a row is a few
            hundred bytes, so writing each one costs nothing next to a training step).
        prefix: put before every metric name (Lightning's).
    """

    def __init__(self, save_dir: str = "runs", flush_logs_every_n_steps: int = 1, prefix: str = ""):
        super().__init__(save_dir=save_dir, name="", version="", prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    def root_dir(self) -> str:
        return self.save_dir

    @property
    def log_dir(self) -> str:
        return self.save_dir

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        """Continue ``metrics.csv`` from a checkpoint at optimizer step ``step``: the rows logged before it stay,
        the interrupted run's rows from it on are dropped (the resumed run logs those steps again)."""
        self.experiment.resume_at(step)
