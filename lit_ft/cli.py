"""The ``lit-ft`` command: LightningCLI's ``fit``/``validate``/``test`` over YAML configs.

    lit-ft fit --config configs/sft.yaml
    lit-ft fit --config configs/sft.yaml --model.backbone.quantization nf4
    python -m lit_ft fit --config configs/mistral7b_qlora_alpaca.yaml

Tools that do not train are subcommands of the same command, each a module with ``main(argv)``:

    lit-ft score --adapter artifacts/rm --prompt "What is 3 + 4?" --response 7 --response 8   (lit_ft.tools.score)
    lit-ft estimate --config configs/mistral7b_qlora_alpaca.yaml                              (lit_ft.tools.estimate)
    lit-ft export --adapter artifacts/sft/adapter --merge --out artifacts/sft/merged          (lit_ft.tools.export)
    lit-ft generate --adapter artifacts/sft/adapter --prompt "What is 3 + 4?" --compare        (lit_ft.tools.generate)
    lit-ft sweep sweeps/sft.yaml --offline --trials 3                                         (lit_ft.tools.sweep)
    lit-ft report runs/sft                                                                    (lit_ft.tools.report)

Configs compose: every run gets the standard callbacks (:data:`STANDARD_CALLBACKS`: checkpoints, NaN guard,
evaluation where a stage sets it, throughput/MFU, memory, profiler, cost, report), each a config group of its own,
and the standard loggers (W&B, metrics.csv), all under ``run.dir`` (:class:`RunSettings`). A stage config states
only what differs::

    run: {dir: runs/ppo, name: ppo-tiny}
    checkpoint: {every_n_train_steps: 40}
    best_checkpoint: null

Tool flags are written with underscores (as LightningCLI's ``--ckpt_path``); :class:`ToolParser` accepts dashes.

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
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger

from lit_ft.errors import CheckpointError, UserError
from lit_ft.loggers.run_dir import CONFIG_FILE, run_dir

DEBUG_FLAG = "--debug"
DEBUG_ENV = "LIT_FT_DEBUG"
# OS faults that are the environment's, not a bug: a full disk or quota, a permission, a read-only file system.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                      errno.EISDIR}

# The LightningCLI subcommands, each one line in ``lit-ft --help``.
STAGE_COMMANDS = {
    "fit": "train a stage from YAML configs: lit-ft fit --config configs/sft.yaml",
    "validate": "run a stage's validation on a checkpoint: lit-ft validate --config ... --ckpt_path FILE",
    "test": "run a stage's test loop on a checkpoint: lit-ft test --config ... --ckpt_path FILE",
}
# What ``lit-ft fit --help`` opens with: where the model and data options are, since they depend on the class.
MODEL_DATA_HELP = (
    "The model and data options depend on their classes (given by class_path in the config). See them with "
    "--model.help CLASS and --data.help CLASS, e.g. `lit-ft fit --model.help lit_ft.stages.causal_lm.CausalLM` "
    "(stages in lit_ft/stages/: causal_lm.CausalLM, reward_model.RewardModel, ppo.PPO, ...; data modules in "
    "lit_ft/data/: instruction.InstructionDataModule, preference.PreferenceDataModule, prompts.PromptDataModule, "
    "...), or a config's resolved settings with `--config configs/sft.yaml --print_config`.")

# Subcommands that are plain tools rather than LightningCLI stages: name -> module holding ``main(argv)``; the
# first line of the module's docstring is its line in ``lit-ft --help``.
TOOLS = {
    "score": "lit_ft.tools.score",
    "estimate": "lit_ft.tools.estimate",
    "export": "lit_ft.tools.export",
    "generate": "lit_ft.tools.generate",
    "pairs": "lit_ft.tools.pairs",
    "sweep": "lit_ft.tools.sweep",
    "report": "lit_ft.tools.report",
    "chat": "lit_ft.tools.chat",
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


@dataclass
class RunSettings:
    """Where a run keeps its files, and its W&B name.

    Args:
        dir: RUN_DIR: ``metrics.csv``, ``config.yaml``, ``report.html``, the W&B folder and ``checkpoints/``. The
            standard loggers write here, and the checkpoint groups whose ``dirpath`` is unset write to
            ``<dir>/checkpoints``. ``runs/default``: a config that names no run still keeps its files under runs/.
        name: the W&B run name (None: W&B picks one, as the sweep's trials want).
    """

    dir: str = "runs/default"
    name: str | None = None


# The callbacks every stage run gets, each a config group of its own (LightningCLI's forced callbacks): a stage
# config sets only what differs (``checkpoint: {init_args: {every_n_train_steps: 40}}``), or turns one off with
# ``null`` (PPO has no validation loss, so no ``best_checkpoint``). Order is the order they run in; Lightning moves
# the checkpoint callbacks after the others, so RunReport is last of the rest: it reads the others' files.
STANDARD_CALLBACKS: dict[str, dict | None] = {
    # Lightning's ModelCheckpoint, written to a temporary file then renamed; last.ckpt is the resume point.
    "checkpoint": {"class_path": "lit_ft.callbacks.checkpointing.ModelCheckpoint",
                   "init_args": {"save_last": True, "every_n_train_steps": 100, "save_top_k": 0}},
    # The best 2 by validation loss (the best and a fallback). No {val/loss} in the file name: its '/' would make a
    # sub-folder.
    "best_checkpoint": {"class_path": "lit_ft.callbacks.checkpointing.ModelCheckpoint",
                        "init_args": {"monitor": "val/loss", "mode": "min", "save_top_k": 2,
                                      "filename": "best-{step}"}},
    # A NaN/inf loss stops the run, naming the step (0: stop at the first; N skips up to N such steps first).
    "nan_guard": {"class_path": "lit_ft.callbacks.nan_guard.NonFiniteGuard", "init_args": {"max_skipped_steps": 0}},
    # Before/after generations on held-out prompts (lit_ft.callbacks.evaluation.GenerationTable): off unless a
    # stage sets it, since what it scores depends on the stage's data.
    "evaluation": None,
    "throughput": {"class_path": "lit_ft.callbacks.throughput.ThroughputMonitor"},  # tokens/s, MFU, loader wait
    "memory": {"class_path": "lit_ft.callbacks.memory.MemoryMonitor"},  # peak memory (CUDA) or RSS vs the estimate
    "profiler": {"class_path": "lit_ft.callbacks.profiler.ProfilerWindow"},  # torch.profiler trace of batches 5-6
    "cost": {"class_path": "lit_ft.callbacks.cost.CostTracker"},  # device-hours, $ and the projected whole run
    "report": {"class_path": "lit_ft.callbacks.report.RunReport"},  # report.html at the end
}

# The loggers of a run whose config leaves ``trainer.logger`` unset: W&B first (the primary logger; offline
# without credentials), then lit_ft's CSV logger (metrics.csv: curves without a W&B account), both in run.dir.
# ``trainer.logger: false`` runs without loggers; a list of its own replaces these.
WANDB_LOGGER = "lit_ft.loggers.wandb_logger.WandbLogger"
CSV_LOGGER = "lit_ft.loggers.csv_logger.CSVLogger"
WANDB_PROJECT = "lit_ft"

# Trainer settings shared by every stage, so that no config repeats them and a recipe resolves the same alone or
# over its stage config.
TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "devices": 1,                   # one device; multi-GPU runs set devices and strategy (docs/fsdp.md)
    "num_sanity_val_steps": 0,      # 0: every stage validates on its own schedule; sanity steps only cost time
    "enable_model_summary": False,  # the backbone logs its own trainable/frozen parameter counts
}
SEED = 42  # one seed for every stage and recipe: runs repeat unless a config or --seed_everything says otherwise


class LitFtCLI(LightningCLI):
    """LightningCLI with subclass mode for modules and data, configs composed with repeated ``--config``.

    Every run gets the standard callbacks (:data:`STANDARD_CALLBACKS`, one config group each) and, unless
    ``trainer.logger`` says otherwise, the standard loggers, all writing under ``run.dir`` (:class:`RunSettings`).
    """

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
            # parser errors: one line (see main); each subcommand's help opens with where the model/data options are
            parser_kwargs={"default_env": False, "exit_on_error": False,
                           **{name: {"description": f"{line[0].upper()}{line[1:]}. {MODEL_DATA_HELP}"}
                              for name, line in STAGE_COMMANDS.items()}},
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=SEED,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (no stage has a predict step)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run", type=RunSettings, default=RunSettings(),
                            help="RUN_DIR and the W&B run name (see lit_ft.cli.RunSettings)")
        for key, default in STANDARD_CALLBACKS.items():
            parser.add_lightning_class_args(Callback, key, subclass_mode=True, required=False)
            parser.set_defaults({key: default})

    def before_instantiate_classes(self) -> None:
        settings = self.config[self.subcommand] if self.subcommand else self.config
        fill_run_dir(settings)

    def instantiate_trainer(self, **kwargs):
        """The standard callbacks that are on (a group set to null is off); with ``trainer.enable_checkpointing:
        false`` the checkpoint groups are off too. The progress bar, when on and none is configured, is
        :class:`lit_ft.callbacks.progress.StepProgressBar`."""
        trainer = dict(self._get(self.config_init, "trainer", default={}), **kwargs)
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        callbacks = [c for c in callbacks if c is not None and not (
            trainer.get("enable_checkpointing") is False and isinstance(c, LightningModelCheckpoint))]
        configured = list(trainer.get("callbacks") or []) + callbacks
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar)
                                                                       for c in configured):
            from lit_ft.callbacks.progress import StepProgressBar  # Lightning's would say "Epoch 3/-2"

            callbacks.append(StepProgressBar())
        return self._instantiate_trainer(trainer, callbacks)

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


def fill_run_dir(settings) -> None:
    """Put the run's files in ``run.dir``: the standard loggers when ``trainer.logger`` is unset,
    ``<run.dir>/checkpoints`` for each standard checkpoint group whose ``dirpath`` is unset, and Lightning's own
    root (``trainer.default_root_dir``, where a run without loggers puts the profiler's trace) when unset."""
    run = settings.get("run") or RunSettings()
    run = run if isinstance(run, RunSettings) else RunSettings(**dict(run))
    if settings.get("trainer.default_root_dir") is None:
        settings["trainer.default_root_dir"] = run.dir
    if settings.get("trainer.logger") is None:
        settings["trainer.logger"] = [
            Namespace(class_path=WANDB_LOGGER,
                      init_args=Namespace(project=WANDB_PROJECT, name=run.name, save_dir=run.dir)),
            Namespace(class_path=CSV_LOGGER, init_args=Namespace(save_dir=run.dir)),
        ]
    for key in STANDARD_CALLBACKS:
        group = settings.get(key)
        init_args = group.get("init_args") if group is not None else None
        if (group is not None and str(group.get("class_path", "")).endswith("ModelCheckpoint")
                and init_args is not None and init_args.get("dirpath") is None):
            init_args["dirpath"] = os.path.join(run.dir, "checkpoints")


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
    settings = cli.config_init.get(subcommand, cli.config_init)
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


def overview() -> str:
    """``lit-ft --help``: every subcommand with one line."""
    width = max(map(len, [*STAGE_COMMANDS, *TOOLS])) + 2
    lines = ["usage: lit-ft COMMAND [options]        (lit-ft COMMAND --help: the command's options)", "",
             "Stages (LightningCLI over YAML configs):"]
    lines += [f"  {name:<{width}}{line}" for name, line in STAGE_COMMANDS.items()]
    lines += ["", "Tools:"]
    lines += [f"  {name:<{width}}{tool_summary(module)}" for name, module in TOOLS.items()]
    lines += ["", "Flags are written with underscores (--max_new_tokens, --ckpt_path); the tools accept dashes too",
              "(--max-new-tokens). --debug shows the traceback of a user error."]
    return "\n".join(lines)


def tool_summary(module: str) -> str:
    """The first line of a tool module's docstring, without its ``lit-ft NAME`` prefix (read, not imported)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    source = Path(spec.origin).read_text() if spec is not None and spec.origin else ""
    doc = (ast.get_docstring(ast.parse(source)) or "").strip().splitlines()
    first = doc[0] if doc else ""
    return re.sub(r"^``lit-ft [^`]*``:\s*", "", first).rstrip(".")


class ToolParser(argparse.ArgumentParser):
    """The tools' argument parser: flags are declared with underscores, as LightningCLI's (``--max_new_tokens``),
    and the dashed spelling (``--max-new-tokens``) is accepted too."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        known = {_underscored(option): option for option in self._option_string_actions if option.startswith("--")}
        rewritten = []
        for arg in args:
            name, eq, value = arg.partition("=")
            spelled = known.get(_underscored(name)) if arg.startswith("--") else None
            rewritten.append(spelled + eq + value if spelled else arg)
        return super().parse_known_args(rewritten, namespace)


def _underscored(option: str) -> str:
    return "--" + option[2:].replace("-", "_") if option.startswith("--") else option


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
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return
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
