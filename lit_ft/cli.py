"""The ``lit-ft`` command: LightningCLI's ``fit``/``validate``/``test`` over YAML configs.

    lit-ft fit --config configs/sft.yaml
    lit-ft fit --config configs/sft.yaml --model.backbone.quantization nf4
    python -m lit_ft fit --config configs/mistral7b_qlora_alpaca.yaml

Tools that do not train are subcommands of the same command, each a module with ``main(argv)``:

    lit-ft score --adapter artifacts/rm --prompt "What is 3 + 4?" --response 7 --response 8   (lit_ft.tools.score)
    lit-ft estimate --config configs/mistral7b_qlora_alpaca.yaml                              (lit_ft.tools.estimate)
    lit-ft export --adapter artifacts/sft/adapter --merge --out artifacts/sft/merged          (lit_ft.tools.export)
    lit-ft generate --adapter artifacts/sft/adapter --prompt "What is 3 + 4?" --compare        (lit_ft.tools.generate)
    lit-ft sweep configs/sweeps/sft.yaml --offline --trials 3                                 (lit_ft.tools.sweep)
    lit-ft report runs/sft                                                                    (lit_ft.tools.report)

User mistakes (a missing file, a bad record, an unknown format, LoRA targets that match nothing, a bad option
value, a checkpoint the config does not continue, a full disk) end with one line on stderr naming what is wrong
and where, and exit code 2, not a traceback. ``--debug`` (anywhere on the command line) or ``LIT_FT_DEBUG=1``
shows the traceback instead.

Resuming (``--ckpt_path last`` or a file): the config wins. LightningCLI would replace the model's settings with
the hyper-parameters stored in a checkpoint file; here they are not read. Before anything is built, the checkpoint
is read and checked against the config (:mod:`lit_ft.stages.run_contract`), the optimiser settings are tried, and
the run's output directories are checked for writability (:mod:`lit_ft.callbacks.preflight`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger

from lit_ft.errors import CheckpointError, UserError
from lit_ft.loggers.run_dir import CONFIG_FILE, run_dir

DEBUG_FLAG = "--debug"
DEBUG_ENV = "LIT_FT_DEBUG"
# OS faults that are the environment's, not a bug: a full disk or quota, a permission, a read-only file system.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                      errno.EISDIR}

# Subcommands that are plain tools rather than LightningCLI stages: name -> module holding ``main(argv)``.
TOOLS = {
    "score": "lit_ft.tools.score",
    "estimate": "lit_ft.tools.estimate",
    "export": "lit_ft.tools.export",
    "generate": "lit_ft.tools.generate",
    "sweep": "lit_ft.tools.sweep",
    "report": "lit_ft.tools.report",
}


class LogConfigCallback(SaveConfigCallback):
    """Writes the resolved config to ``RUN_DIR/config.yaml`` and logs it to every logger (W&B: the run's config).

    RUN_DIR is :func:`lit_ft.loggers.run_dir.run_dir`: the CSV logger's folder (``runs/<stage>``), else the first
    logger's ``save_dir``. Without loggers, Lightning would write ``config.yaml`` into the working directory, outside
    the run's own folders: it goes into the first checkpoint directory instead, or nowhere when the run has none.

    It does so when the run starts (``on_fit_start``, or the start of ``validate``/``test``), after a resumed
    checkpoint was accepted: a refused resume leaves the run's files as they were.
    """

    _stage = "fit"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_to_log_dir = False  # save_config writes it, to RUN_DIR rather than Lightning's trainer.log_dir

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = stage  # saved at the start of the run instead (see the class docstring)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def _save(self, trainer, pl_module) -> None:
        if self.already_saved:
            return
        if run_dir(trainer) is None:
            dirs = [cb.dirpath for cb in trainer.checkpoint_callbacks
                    if isinstance(cb, LightningModelCheckpoint) and cb.dirpath]
            if dirs and trainer.is_global_zero:
                Path(dirs[0]).mkdir(parents=True, exist_ok=True)
                self.parser.save(self.config, os.path.join(dirs[0], self.config_filename), skip_none=False,
                                 overwrite=True, multifile=self.multifile)
        super().setup(trainer, pl_module, self._stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        directory = run_dir(trainer)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(directory / CONFIG_FILE), skip_none=False, overwrite=True,
                             multifile=self.multifile)
        config = self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config)
        config.pop("config", None)
        for logger in trainer.loggers:
            if isinstance(logger, Logger):
                logger.log_hyperparams(_flatten(config))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return flat


class LitFtCLI(LightningCLI):
    """LightningCLI with subclass mode for modules and data, configs composed with repeated ``--config``."""

    def __init__(self, args=None, run: bool = True):
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LogConfigCallback,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            auto_configure_optimizers=False,
            parser_kwargs={"default_env": False, "exit_on_error": False},  # parser errors: one line (see main)
        )

    def _parse_ckpt_path(self) -> None:
        """The config wins: a checkpoint's stored hyper-parameters never replace the config's model settings
        (LightningCLI's own version does that for ``--ckpt_path FILE``). The checkpoint is checked against the
        config instead, in :meth:`before_fit`."""

    def before_fit(self) -> None:
        check_before_work(self, "fit")
        self.connect_data()

    def before_validate(self) -> None:
        check_before_work(self, "validate")
        self.connect_data()

    def before_test(self) -> None:
        check_before_work(self, "test")
        self.connect_data()

    def connect_data(self) -> None:
        """Connect the data module to the model's tokenizer (the data layer's contract,
        :meth:`lit_ft.data.records.RecordsDataModule.connect`): one place for every stage, run before ``fit``,
        ``validate`` and ``test`` (not at instantiation, so that building the CLI does not load a tokenizer)."""
        connect = getattr(self.datamodule, "connect", None)
        tokenizer = getattr(self.model, "tokenizer", None) if callable(connect) else None
        if tokenizer is not None:
            connect(tokenizer)


def check_before_work(cli: LightningCLI, subcommand: str) -> None:
    """Everything that can be known wrong before the model is built: the checkpoint (readable, and continued by
    this config), the optimiser's settings, and the output directories."""
    from lit_ft.backbone.adapters import validate_lora
    from lit_ft.callbacks.preflight import check_writable
    from lit_ft.stages.run_contract import check_before_build, check_export_target
    from lit_ft.stages.schedules import check_optimizer_settings

    trainer, module = cli.trainer, cli.model
    fitting = subcommand == "fit"
    # With a subcommand the settings are under its name; built with run=False they are the top level.
    settings = cli.config_init[subcommand] if subcommand in cli.config_init else cli.config_init
    path = resolve_ckpt_path(trainer, settings.get("ckpt_path"))
    if path is not None:
        check_before_build(module, trainer, cli.datamodule, path, fitting, settings.get("weights_only"))
    if not fitting:
        return
    if callable(getattr(module, "optimizer_fn", None)) and callable(getattr(module, "scheduler_fn", None)):
        check_optimizer_settings(module.optimizer_fn, module.scheduler_fn)
    lora = getattr(getattr(module, "backbone", None), "lora", None)
    if lora is not None:
        validate_lora(lora)
    for callback in trainer.checkpoint_callbacks:
        check_writable(getattr(callback, "dirpath", None), "ModelCheckpoint.dirpath")
    export_dir = getattr(module, "export_dir", None)
    if export_dir:
        check_export_target(module, trainer, cli.datamodule)
        check_writable(Path(os.path.expanduser(str(export_dir))).parent, "model.export_dir")
    for logger in trainer.loggers:
        check_writable(getattr(logger, "save_dir", None), f"{type(logger).__name__}.save_dir")


def resolve_ckpt_path(trainer, ckpt_path: str | None) -> str | None:
    """The file ``ckpt_path`` names: ``last`` is the newest ``last*.ckpt`` of the checkpoint callbacks (None
    when there is none yet, as in Lightning: the run starts fresh), ``hpc`` the newest ``hpc_ckpt_*.ckpt``;
    ``best`` means nothing in a new process (an error); a model-registry name is left to Lightning."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        candidates = set()
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, LightningModelCheckpoint):
                candidates |= callback._find_last_checkpoints(trainer)
        existing = [p for p in candidates if os.path.isfile(p)]
        return max(existing, key=os.path.getmtime) if existing else None
    if ckpt_path == "best":
        raise CheckpointError("--ckpt_path best: the best checkpoint is known only inside the process that trained "
                              "it; pass its file (e.g. <checkpoint folder>/best-step=N.ckpt) or 'last'")
    if ckpt_path == "hpc":
        path = trainer._checkpoint_connector._hpc_resume_path
        if path is None:
            raise CheckpointError(f"--ckpt_path hpc: no hpc_ckpt_*.ckpt in {trainer.default_root_dir}")
        return str(path)
    if str(ckpt_path).startswith("registry:"):
        return None
    return str(ckpt_path)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lit-ft`` and ``python -m lit_ft``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if DEBUG_FLAG in argv:
        argv = [a for a in argv if a != DEBUG_FLAG]
        if args is None:  # keep LightningCLI reading sys.argv itself (it warns when given both)
            sys.argv[1:] = argv
        else:
            args = argv
    try:
        if argv[:1] and argv[0] in TOOLS:  # a plain tool, not a LightningCLI subcommand
            importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
            return
        LitFtCLI(args=args)
    except Exception as err:  # user mistakes become one line; anything else re-raises
        message = user_error_line(err)
        if message is None or debug:
            raise
        print(f"lit-ft: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def user_error_line(err: BaseException) -> str | None:
    """The one line that reports ``err`` when it is the user's to fix, else None (a bug: keep the traceback).

    User faults: a :class:`lit_ft.errors.UserError` (also when jsonargparse wrapped it while instantiating), a
    command-line or config error from the parser, a Lightning misconfiguration, and OS faults of the environment
    (full disk, permissions, read-only file system).
    """
    user_error = _user_error(err)
    if user_error is not None:
        return str(user_error)
    if isinstance(err, argparse.ArgumentError):
        return _parser_error_line(str(err))
    for cause in _chain(err):
        if isinstance(cause, MisconfigurationException):
            return _one_line(str(cause))
        if isinstance(cause, OSError) and cause.errno in ENVIRONMENT_ERRNOS:
            where = f"{cause.filename}: " if cause.filename else ""
            return f"{where}{cause.strerror or cause}"
    return None


def _chain(err: BaseException | None):
    seen = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


def _user_error(err: BaseException | None) -> BaseException | None:
    """The user error (:class:`lit_ft.errors.UserError`) behind ``err``, also when jsonargparse wrapped it while instantiating."""
    return next((e for e in _chain(err) if isinstance(e, UserError)), None)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


# jsonargparse's nested report, one line per Union alternative it tried: these lines carry nothing for the user.
_PARSER_NOISE = re.compile(r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:|"
                           r"- Expected a <class 'NoneType'>|Given value type: |Given value: |"
                           r"- Problem with given class_path )")


def _parser_error_line(text: str) -> str:
    """jsonargparse's multi-line report as one line: the dotted key and the first message that says something."""
    keys, details = [], []
    for raw in text.strip().splitlines():
        line = raw.strip()
        keys += re.findall(r'Parser key "([^"]+)"', line)
        line = re.sub(r'^(- )?Parser key "[^"]+":\s*', "", line)
        if line and not _PARSER_NOISE.match(line):
            details.append(line.removeprefix("- "))
    detail = details[0] if details else _one_line(text)
    key = ".".join(keys)
    return f"{key}: {detail}" if key and not detail.startswith(key) else detail


if __name__ == "__main__":
    main()
