"""The command line explains itself: ``lit-ft --help`` lists every subcommand with one line, ``lit-ft fit --help``
says where the model and data options are, the tools' flags are written one way (underscores) and accept dashes,
and ``make help`` (also a bare ``make``) lists the Makefile's targets."""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import subprocess

import pytest

from lit_ft.cli import STAGE_COMMANDS, TOOLS, ToolParser, main, tool_summary
from tests.tiny_models import ROOT


@pytest.mark.parametrize("args", [["--help"], ["-h"], []], ids=["--help", "-h", "bare"])
def test_help_lists_every_subcommand_with_one_line(args, capsys) -> None:
    main(args)
    out = capsys.readouterr().out
    for name in [*STAGE_COMMANDS, *TOOLS]:
        (line,) = [row for row in out.splitlines() if row.split()[:1] == [name]]
        assert len(line.split(None, 1)[1]) > 10, line  # a description, not just the name
    assert {"fit", "validate", "test", "score", "estimate", "export", "generate", "sweep", "report"} <= {
        row.split()[0] for row in out.splitlines() if row.startswith("  ")}


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_tool_has_a_main_and_a_one_line_summary(name) -> None:
    assert tool_summary(TOOLS[name]) and "\n" not in tool_summary(TOOLS[name])
    assert callable(importlib.import_module(TOOLS[name]).main)


def test_fit_help_says_where_the_model_and_data_options_are(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code in (0, None)
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.help CLASS" in out and "--data.help CLASS" in out and "lit_ft.stages.causal_lm.CausalLM" in out
    assert "predict" not in STAGE_COMMANDS


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tool_flags_are_written_with_underscores(name, capsys) -> None:
    with pytest.raises(SystemExit):
        main([name, "--help"])
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", capsys.readouterr().out))
    dashed = {f for f in flags if "-" in f[2:] and not f.startswith("--no-")}
    assert not dashed, f"lit-ft {name}: {sorted(dashed)} (flags use underscores; dashes are accepted on input)"


def test_tool_parser_accepts_dashes_for_underscored_flags() -> None:
    parser = ToolParser()
    parser.add_argument("--max_new_tokens", type=int)
    parser.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction)
    parser.add_argument("--prompt")
    args, rest = parser.parse_known_args(["--max-new-tokens=3", "--no-load-in-4bit", "--prompt=--max-new-tokens",
                                          "--model.init_args.lr=1"])
    assert (args.max_new_tokens, args.load_in_4bit, args.prompt) == (3, False, "--max-new-tokens")  # values stay
    assert rest == ["--model.init_args.lr=1"]  # unknown options pass through unchanged


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_help_lists_the_targets_and_bare_make_only_shows_it() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.MULTILINE).group(1).split()
    for args in (["help"], []):
        out = subprocess.run(["make", "-s", "-C", str(ROOT), "--dry-run", *args], capture_output=True, text=True,
                             check=True).stdout
        assert "pip install" not in out and "venv" not in out.split("install", 1)[0]  # nothing runs but help
    out = subprocess.run(["make", "-s", "-C", str(ROOT)], capture_output=True, text=True, check=True).stdout
    listed = {row.split()[0] for row in out.splitlines() if row.startswith("  ")}
    assert set(phony) <= listed, sorted(set(phony) - listed)
