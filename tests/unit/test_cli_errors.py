"""Which faults are the user's (one line, exit code 2) and how they read; the rest keep their traceback."""

from __future__ import annotations

import argparse
import errno
import os

import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lit_ft.cli import main, user_error_line
from lit_ft.errors import CheckpointError

UNION_REPORT = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lit_ft.stages.causal_lm.CausalLM':
        Parser key "backbone":
          Does not validate against any of the Union subtypes
          Errors:
            - Problem with given class_path 'lit_ft.backbone.Backbone':
                Parser key "lora":
                  Parser key "r":
                    Expected a <class 'int'>. Got value: x
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='backbone.lora.r', val='x')"""


@pytest.mark.parametrize("err, line", [
    (CheckpointError("a.ckpt: checkpoint not found"), "a.ckpt: checkpoint not found"),
    (RuntimeError("while instantiating"), None),
    (KeyError("attention_mask"), None),  # a bug keeps its traceback
    (argparse.ArgumentError(None, UNION_REPORT), "model.backbone.lora.r: Expected a <class 'int'>. Got value: x"),
    (argparse.ArgumentError(None, 'Parser key "trainer.max_steps":\n  Expected a <class \'int\'>. Got value: abc'),
     "trainer.max_steps: Expected a <class 'int'>. Got value: abc"),
    (argparse.ArgumentError(None, "unrecognized arguments: fitt"), "unrecognized arguments: fitt"),
    (MisconfigurationException("You restored a checkpoint with current_epoch=3,\n but max_epochs=1."),
     "You restored a checkpoint with current_epoch=3, but max_epochs=1."),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/adapter.tmp"), "/runs/x/adapter.tmp: No space left on device"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/runs"), "/runs: Permission denied"),
    (OSError(errno.EIO, os.strerror(errno.EIO), "/dev/sda"), None),  # a hardware fault is not a user mistake
])
def test_user_error_line(err, line) -> None:
    assert user_error_line(err) == line


def test_user_error_wrapped_by_the_parser_is_found() -> None:
    try:
        try:
            raise CheckpointError("x.ckpt: empty file")
        except CheckpointError as inner:
            raise RuntimeError("Problem with given class_path") from inner
    except RuntimeError as outer:
        assert user_error_line(outer) == "x.ckpt: empty file"


def test_parser_errors_are_one_line_and_debug_is_not_an_option(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fitt"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lit-ft: error: "), err
    with pytest.raises(argparse.ArgumentError):
        main(["fitt", "--debug"])  # --debug: the traceback instead of the line; never passed to the parser
