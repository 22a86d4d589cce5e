"""Fail before work: the directories a run writes to are checked before its first step.

A run writes checkpoints (``ModelCheckpoint.dirpath``), an export (the module's ``export_dir``) and logs. Each
directory must accept a new file, and the disk must have room for what the run will put there; otherwise the run
stops with one line naming the setting, before any training step, instead of after minutes or hours of it.

- :func:`check_writable` creates the directory when it is missing (it is the run's own) and writes, then removes,
  a probe file: a path under a regular file, a read-only file system or a permission fault is found here, also
  for ``root``, whom permission bits do not stop.
- :func:`check_free_space` compares free disk with the bytes the run will write there;
  :func:`checkpoint_bytes` and :func:`export_bytes` estimate them from the built model.

Called by the CLI before anything is built (writability), by :class:`lit_ft.callbacks.checkpointing.ModelCheckpoint`
and by the stages' :class:`lit_ft.stages.run_contract.CheckpointContract` once the model exists (disk).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from lit_ft.errors import OutputError

PROBE_PREFIX = ".lit-ft-write-check-"
# What an earlier export leaves in its folder: a PEFT adapter, a full model, a reward model, PPO's two roles.
EXPORT_MARKERS = ("adapter_config.json", "config.json", "reward_stats.json", "policy", "value")
MARGIN_BYTES = 16 * 2**20  # 16 MiB beyond the estimate: file-system metadata, logs, the tokenizer of an export
OPTIMIZER_STATE_FACTOR = 2  # Adam keeps two moments per trainable parameter, in the parameter's dtype


def is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(path).removeprefix("file://")))


def check_writable(path: str | os.PathLike | None, what: str) -> None:
    """Make sure ``path`` is a directory this process can create files in (created when missing).

    ``what`` names the setting in the error (e.g. ``model.export_dir``). Remote paths (``s3://``) are not checked.
    """
    if path is None or not is_local(path):
        return
    directory = _local(path)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{what} ({path}): not a directory (a file of that name exists)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{what} ({path}): not writable ({err.strerror or err})") from None


def check_free_space(path: str | os.PathLike | None, need_bytes: int, what: str) -> None:
    """Fail when the file system of ``path`` has less than ``need_bytes`` (+ a margin) free."""
    if path is None or not is_local(path) or need_bytes <= 0:
        return
    directory = _local(path)
    while not directory.exists() and directory != directory.parent:  # the nearest existing folder
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    need = need_bytes + MARGIN_BYTES
    if free < need:
        raise OutputError(f"{what} ({path}): {_size(free)} free on its disk, the run needs about {_size(need)} "
                          "there; free some space or point it elsewhere")


def check_export_dir(path: str | os.PathLike | None, inputs: dict[str, str]) -> None:
    """An export replaces its folder when training ends: refuse, before any work, a folder that is a file, that is
    or holds one of the run's inputs and outputs (``inputs``: setting -> path: the base model, an adapter the run
    starts from, the data, the checkpoint folder), or that holds files other than an earlier export."""
    if path is None or not is_local(path):
        return
    out = _local(path).resolve()
    if out.is_file():
        raise OutputError(f"model.export_dir ({path}): a file, not a folder")
    for name, other in inputs.items():
        if not is_local(other):
            continue
        target = _local(other).resolve()
        if target == out or out in target.parents:
            raise OutputError(f"model.export_dir ({path}) would replace {name} ({other}); export somewhere else")
    if out.is_dir() and any(out.iterdir()) and not any((out / marker).exists() for marker in EXPORT_MARKERS):
        raise OutputError(f"model.export_dir ({path}): holds files that are not an earlier export, and an export "
                          "replaces the folder; choose a new or empty folder")


def trainable_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """Expected size of one checkpoint: the trainable parameters, their optimiser state and the kept buffers."""
    buffers = dict(module.named_buffers())
    kept = sum(buffers[n].numel() * buffers[n].element_size() for n in getattr(module, "checkpoint_buffers", ())
               if n in buffers)
    return trainable_bytes(module) * (1 + OPTIMIZER_STATE_FACTOR) + kept


def export_bytes(module: torch.nn.Module) -> int:
    """Expected size of an export: the trained parameters (an adapter, or the whole model when all trained)."""
    return trainable_bytes(module)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
