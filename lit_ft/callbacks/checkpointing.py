"""Checkpoints that survive a SIGKILL, keep the best k plus ``last``, and carry the W&B run id for resume.

Lightning 2.6 writes a local checkpoint through an fsspec transaction: into a file made by ``tempfile.mkstemp``
in the *system* temporary directory, then ``shutil.move`` onto the target. When that directory is another file
system (a tmpfs ``/tmp``, a different disk) the move is a copy onto the target, and a kill during the copy leaves
a truncated ``last.ckpt``. Nothing is fsync'ed either. :class:`AtomicCheckpointIO` writes next to the target,
fsyncs, and renames with ``os.replace``, which is atomic on one file system: a kill at any moment leaves either
the previous checkpoint or the new one.

:class:`ModelCheckpoint` is Lightning's, plus:

- it installs :class:`AtomicCheckpointIO` when the strategy uses the plain ``TorchCheckpointIO`` (other
  strategies, FSDP or DeepSpeed, keep their own sharded writers);
- it removes temporary files that a killed write left behind;
- it stores the W&B run id in each checkpoint, and on resume asks a :class:`lit_ft.loggers.wandb_logger.WandbLogger` to
  continue that run instead of starting a new one.

Retention is Lightning's: ``save_top_k`` by ``monitor`` keeps the best k, ``save_last`` keeps ``last.ckpt`` too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

TMP_PREFIX = ".ckpt-write-"  # never contains "last", so Lightning's `ckpt_path="last"` search cannot pick one up
TMP_SUFFIX = ".tmp"
WANDB_RUN_ID_KEY = "wandb_run_id"  # top-level checkpoint key


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (a no-op where directories cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are all-or-nothing: temporary file in the same folder, fsync,
    ``os.replace``. Remote paths (``s3://`` ...) go through Lightning's own writer unchanged."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{TMP_PREFIX}{os.getpid()}{TMP_SUFFIX}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.commit(tmp, target)

    def commit(self, tmp: Path, target: Path) -> None:
        """Flush the finished temporary file to disk and rename it onto ``target``."""
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)


def remove_stale_writes(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by writes that were killed before their rename; returns what was removed."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    stale = sorted(folder.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def wandb_run_id(trainer: L.Trainer) -> str | None:
    """The id of the trainer's W&B run, without creating one (None when there is no W&B logger)."""
    for logger in trainer.loggers:
        if hasattr(logger, "continue_run") and logger.version:
            return str(logger.version)
    return None


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with atomic writes, stale-write cleanup and W&B run continuation.

    Takes exactly Lightning's arguments. Typical use: one instance with ``save_last: true`` and
    ``every_n_train_steps`` (the resume point), and one with ``monitor``/``save_top_k`` (the best k).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        if type(getattr(strategy, "_checkpoint_io", None)) in (TorchCheckpointIO, type(None)):
            strategy.checkpoint_io = AtomicCheckpointIO()  # only replace the default writer, never a custom one
        if trainer.is_global_zero and self.dirpath is not None and _is_local(self.dirpath):
            remove_stale_writes(self.dirpath)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        run_id = wandb_run_id(trainer)
        if run_id is not None:
            checkpoint[WANDB_RUN_ID_KEY] = run_id

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        run_id = checkpoint.get(WANDB_RUN_ID_KEY)
        if run_id is None:
            return
        for logger in trainer.loggers:
            if hasattr(logger, "continue_run"):
                logger.continue_run(run_id)
