"""The user-facing errors: a mistake in a config, a data file, a checkpoint or a command line.

Every subclass of :class:`UserError` ends a ``lit-ft`` command with one line on stderr and exit code 2 (see
:mod:`lit_ft.cli`); anything else is a bug and keeps its traceback. Set ``LIT_FT_DEBUG=1`` (or pass ``--debug``)
to see the traceback of a user error too.
"""

from __future__ import annotations


class UserError(ValueError):
    """A fault the user can fix (one line, no traceback). Subclasses say which part of the setup is wrong."""


class ConfigError(UserError):
    """A setting of a stage, a callback or the trainer that cannot work (a bad value or combination)."""


class BackboneError(UserError):
    """A problem with the base model, its tokenizer or its adapters (missing, mismatched, unsupported)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, unreadable, or written by a run the config does not continue
    (another stage, base model, adapter or data); see :mod:`lit_ft.stages.run_contract`."""


class OutputError(UserError):
    """A place the run must write to that cannot take it: not writable, or too little free disk."""


def check_choice(setting: str, value: object, choices: object) -> None:
    """A string setting outside its choices (a ``Literal`` type or a tuple) is a one-line :class:`ConfigError`.

    The command line checks ``Literal`` types itself; this catches a module or settings object built in Python.
    """
    allowed = tuple(getattr(choices, "__args__", choices))
    if value not in allowed:
        names = [repr(choice) for choice in allowed]
        listed = " or ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ConfigError(f"{setting} must be {listed}, got {value!r}")
