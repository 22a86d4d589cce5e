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
- before the first step it checks that its directory accepts files and that the disk has room for the
  checkpoints it will keep (:mod:`lit_ft.callbacks.preflight`); a write that fails during the run (a full disk,
  a permission fault) removes its temporary file, keeps the previous checkpoint and ends the run in one line;
- it stores the W&B run id in each checkpoint, and on resume asks a :class:`lit_ft.loggers.wandb_logger.WandbLogger` to
  continue that run instead of starting a new one, but only when the checkpoint is this run's own (it lies in one
  of this run's checkpoint directories). Starting from another run's checkpoint file forks: a new W&B run, and
  nothing is written into the other run's directories.

Retention is Lightning's: ``save_top_k`` by ``monitor`` keeps the best k, ``save_last`` keeps ``last.ckpt`` too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from lit_ft.callbacks.preflight import check_free_space, check_writable, checkpoint_bytes, is_local
from lit_ft.errors import ConfigError, OutputError

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


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are all-or-nothing: temporary file in the same folder, fsync,
    ``os.replace``. Remote paths (``s3://`` ...) go through Lightning's own writer unchanged.

    A write that fails (``ENOSPC``, ``EACCES``...) removes its temporary file, leaves the previous checkpoint as
    it was, and raises :class:`lit_ft.errors.OutputError` (one line from ``lit-ft``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if not is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        target = Path(str(path).removeprefix("file://"))
        tmp = target.with_name(f"{TMP_PREFIX}{os.getpid()}{TMP_SUFFIX}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:  # written in place: no copy through the system temporary directory
                torch.save(checkpoint, f)
            self.commit(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            kept = f"the previous {target.name} is kept" if target.exists() else "no earlier checkpoint there"
            raise OutputError(f"{target}: checkpoint not written ({err.strerror or err}); {kept}") from err

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
        if trainer.is_global_zero and self.dirpath is not None and is_local(self.dirpath):
            check_writable(self.dirpath, "ModelCheckpoint.dirpath")
            remove_stale_writes(self.dirpath)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Room on the disk for the checkpoints this callback keeps (plus one being written), before any step."""
        if not trainer.is_global_zero or self.dirpath is None:
            return
        kept = (1 if self.save_last else 0) + max(self.save_top_k, 0)
        if self.save_top_k == -1:  # every checkpoint is kept
            every = self._every_n_train_steps or 1
            kept += max(1, trainer.max_steps // every) if trainer.max_steps and trainer.max_steps > 0 else 1
        check_free_space(self.dirpath, checkpoint_bytes(pl_module) * (kept + 1), "ModelCheckpoint.dirpath")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        run_id = wandb_run_id(trainer)
        if run_id is not None:
            checkpoint[WANDB_RUN_ID_KEY] = run_id

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        ours = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        if ours[:1] != [self]:  # the first of this run's ModelCheckpoints decides, once
            return
        path = trainer.ckpt_path
        if path is not None and not is_own_checkpoint(trainer, path):
            wandb = any(hasattr(logger, "continue_run") for logger in trainer.loggers)
            rank_zero_only(print)(f"lit_ft: starting from {path}, a checkpoint of another run: this run writes "
                                  f"only to its own directories{' and logs to a new W&B run' if wandb else ''}")
            return
        run_id = checkpoint.get(WANDB_RUN_ID_KEY)
        if run_id is None:
            return
        for logger in trainer.loggers:
            if hasattr(logger, "continue_run"):
                logger.continue_run(run_id)


def is_own_checkpoint(trainer: L.Trainer, path: str | os.PathLike) -> bool:
    """Whether ``path`` lies in one of ``trainer``'s checkpoint directories (a resume, not a fork)."""
    if not is_local(path):
        return True
    folder = Path(str(path).removeprefix("file://")).resolve().parent
    dirs = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return any(is_local(d) and Path(str(d).removeprefix("file://")).resolve() == folder for d in dirs)


def check_between_rollouts(trainer: L.Trainer, updates_per_batch: int, made_of: str) -> None:
    """RL stages (PPO, GRPO) checkpoint between rollout batches only, where their state is whole: each checkpoint
    callback's ``every_n_train_steps`` must be a multiple of the optimizer updates one rollout batch makes
    (``made_of`` names the product, e.g. "ppo.epochs x minibatches"). A one-line :class:`ConfigError` otherwise."""
    for callback in trainer.checkpoint_callbacks:
        every = getattr(callback, "_every_n_train_steps", 0)
        if every and every % updates_per_batch:
            raise ConfigError(f"checkpoint every_n_train_steps={every} must be a multiple of the {updates_per_batch} "
                              f"optimizer updates each rollout batch makes ({made_of}), so that checkpoints fall "
                              "between batches")
