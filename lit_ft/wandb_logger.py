"""Weights & Biases logging that never prompts and never blocks.

With credentials (``WANDB_API_KEY``, or a ``wandb login`` entry in ``~/.netrc``) runs go online; without them
they are written offline into the run directory and can be uploaded later with ``wandb sync``. ``WANDB_MODE``,
when set, wins.
"""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


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
        os.environ.setdefault("WANDB_SILENT", "true")
        kwargs.setdefault("settings", _quiet_settings())
        super().__init__(
            project=project, save_dir=save_dir, name=name, offline=offline, log_model=log_model, **kwargs
        )
        if offline:
            rank_zero_info(f"lit_ft: W&B offline run in {save_dir}/wandb (upload later with `wandb sync`)")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Close the W&B run when the stage ends, so that the next stage in the same process (``make pipeline``
        from Python, tests) starts its own run in its own directory instead of writing into this one."""
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


def _quiet_settings():
    import wandb

    return wandb.Settings(console="off", silent=True, x_disable_stats=True)
