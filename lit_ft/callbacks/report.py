"""The run's report: ``RUN_DIR/report.html`` written when ``fit`` ends (or fails), and the CSV log continued on resume.

The page is built by :func:`lit_ft.tools.report.write_report` from the files in the run directory only
(:mod:`lit_ft.loggers.run_dir`), the same as ``lit-ft report RUN_DIR`` after the fact. List this callback after
the evaluation and cost callbacks: it reads the files they write at the end of training.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from lit_ft.loggers.csv_logger import CSVLogger
from lit_ft.loggers.run_dir import run_dir


class RunReport(L.Callback):
    """Writes ``RUN_DIR/report.html`` at the end of ``fit`` and after a failed one; on resume, tells the CSV
    logger to continue ``metrics.csv`` from the checkpoint's step.

    Args:
        on_failure: also write the report when ``fit`` stops with an error (True: the curves up to the failure are
            what one wants to see then).
    """

    def __init__(self, on_failure: bool = True):
        self.on_failure = on_failure
        self.path = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        step = int(checkpoint.get("global_step", 0))
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.resume_at(step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.on_failure and not isinstance(exception, KeyboardInterrupt):
            self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        directory = run_dir(trainer)
        if directory is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # whatever a logger still buffers goes to metrics.csv first
            if isinstance(logger, CSVLogger):
                logger.save()
        from lit_ft.tools.report import write_report  # matplotlib only when a report is written

        try:
            self.path = write_report(directory)
        except Exception as err:  # noqa: BLE001 - a report never fails the run it reports on
            rank_zero_warn(f"lit_ft: could not write the report in {directory}: {err}")
            return
        print(f"report: {self.path} (open it in a browser; rebuild with `lit-ft report {directory}`)")
