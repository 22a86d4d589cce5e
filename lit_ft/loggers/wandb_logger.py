"""Weights & Biases logging that never prompts and never blocks.

With credentials (``WANDB_API_KEY``, or a ``wandb login`` entry in ``~/.netrc``) runs go online; without them
they are written offline into the run directory and can be uploaded later with ``wandb sync``. ``WANDB_MODE``,
when set, wins.

Online runs keep W&B's own settings: its terminal lines (the run URL), console capture and system charts (GPU,
CPU, memory). Offline runs are quiet in the terminal (W&B's lines would only repeat the folder and the sync
command, which lit_ft prints in one line) and do not capture the console, but keep the system metrics, so that a
run uploaded later with ``wandb sync`` has its GPU charts. Settings passed as ``settings:`` win over both.

A resumed fit (``--ckpt_path``) continues the W&B run of its checkpoint: :class:`lit_ft.callbacks.checkpointing.ModelCheckpoint`
stores the run id in every checkpoint and calls :meth:`WandbLogger.continue_run` when one is restored.
"""

from __future__ import annotations

import netrc
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn


def wandb_credentials_available() -> bool:
    """True when W&B could authenticate without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, offline by default when no credentials are found.

    Args:
        project: W&B project name.
        save_dir: run directory; the offline run lands in ``<save_dir>/wandb/offline-run-*``.
        name: display name of the run.
        offline: force offline (True) or online (False); None decides from the credentials found.
        log_model: upload checkpoints as W&B artifacts (False: adapters are small but the default stays local).
        kwargs: passed through to ``wandb.init`` (entity, tags, group, id, resume...).
    """

    def __init__(
        self,
        project: str = "lit_ft",
        save_dir: str = "runs",
        name: str | None = None,
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ):
        mode = os.environ.get("WANDB_MODE")
        if offline is None:
            offline = mode in ("offline", "dryrun") or (mode != "online" and not wandb_credentials_available())
        os.makedirs(save_dir, exist_ok=True)
        if offline and kwargs.get("settings") is None:  # the CLI passes every wandb.init argument, None when unset
            kwargs["settings"] = offline_settings()
        super().__init__(
            project=project, save_dir=save_dir, name=name, offline=offline, log_model=log_model, **kwargs
        )
        if offline:
            rank_zero_info(f"lit_ft: W&B offline run in {save_dir}/wandb (upload later with `wandb sync`)")

    @rank_zero_only
    def continue_run(self, run_id: str) -> None:
        """Log into the W&B run ``run_id`` (``resume="allow"``) from now on, keeping the config logged so far.

        Lightning creates the run before a checkpoint is restored, so a resumed fit has already started a new one
        by the time the checkpoint's run id is known: that run is finished and, offline, its directory removed
        (it holds only the config). Online, it stays as a short run on the server.
        """
        if self._experiment is not None and self._experiment.id == run_id:
            return
        config: dict[str, Any] = {}
        if self._experiment is not None:
            config = dict(self._experiment.config)
            started = Path(self._experiment.dir).parent  # <save_dir>/wandb/offline-run-*/files -> the run dir
            offline = bool(getattr(self._experiment.settings, "_offline", self._offline))
            self._experiment.finish()
            self._experiment = None
            if offline and started.name.startswith("offline-run-"):
                shutil.rmtree(started, ignore_errors=True)
        self._wandb_init.update(id=run_id, resume="allow")
        self._id = run_id
        if not self._open_resumed_run(run_id):
            return
        if config:
            self.experiment.config.update(config, allow_val_change=True)

    def _open_resumed_run(self, run_id: str, attempts: int = 5, wait_s: float = 2.0) -> bool:
        """Open run ``run_id``; retried while W&B still holds it for the killed process ("run ID is in use": the
        crashed run's W&B service outlives it for a few seconds). If it stays busy, log to a new run with a
        warning: a resumed fit never fails because of its logger."""
        for attempt in range(attempts):
            try:
                _ = self.experiment
                return True
            except Exception as err:  # noqa: BLE001 - wandb's error types move between releases
                if "in use" not in str(err) or attempt == attempts - 1:
                    rank_zero_warn(f"lit_ft: could not continue W&B run {run_id} ({err}); logging to a new run")
                    self._wandb_init.pop("id", None)
                    self._wandb_init.pop("resume", None)
                    self._id = None
                    return False
                time.sleep(wait_s)
        return False

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Close the W&B run when the stage ends, so that the next stage in the same process (``make pipeline``
        from Python, tests) starts its own run in its own directory instead of writing into this one."""
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


def offline_settings():
    """W&B settings of an offline run: no W&B lines in the terminal (``silent``) and no console capture
    (``console="off"``: it wraps sys.stdout for a log that only ``wandb sync`` would show); system metrics stay on
    (they upload with the run). Online runs get W&B's defaults: nothing an account holder expects is hidden."""
    import wandb

    return wandb.Settings(console="off", silent=True)
