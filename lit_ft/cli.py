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

User mistakes (a missing file, a bad record, an unknown format, LoRA targets that match nothing) end with one
line on stderr naming what is wrong and where, not a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger

from lit_ft.errors import UserError
from lit_ft.loggers.run_dir import CONFIG_FILE, run_dir

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
    logger's ``save_dir``; without loggers nothing is written (Lightning's default would drop ``config.yaml`` in the
    working directory).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_to_log_dir = False  # save_config writes it, to RUN_DIR rather than Lightning's trainer.log_dir

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
            parser_kwargs={"default_env": False},
        )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lit-ft`` and ``python -m lit_ft``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] and argv[0] in TOOLS:  # a plain tool, not a LightningCLI subcommand
            importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
            return
        LitFtCLI(args=args)
    except Exception as err:  # user mistakes become one line; anything else re-raises
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"lit-ft: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_error(err: BaseException | None) -> BaseException | None:
    """The user error (:class:`lit_ft.errors.UserError`) behind ``err``, also when jsonargparse wrapped it while instantiating."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
